{{/*
Expand the name of the chart.
*/}}
{{- define "atlas-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name (63 characters: some name fields are DNS labels).
If the release name contains the chart name it is used as the full name.
*/}}
{{- define "atlas-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version as used by the chart label.
*/}}
{{- define "atlas-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "atlas-operator.labels" -}}
helm.sh/chart: {{ include "atlas-operator.chart" . }}
{{ include "atlas-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: atlas
{{- end }}

{{/*
Selector labels (never change them: a Deployment's selector is immutable).
*/}}
{{- define "atlas-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "atlas-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The name of the ServiceAccount to use.
*/}}
{{- define "atlas-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "atlas-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator's RBAC rules: least privilege, exactly the verbs and resources the operator
(and kopf under it) uses. Shared by the ClusterRole (rbac.scope=cluster) and the Role in
each watched namespace (rbac.scope=namespace), which leaves out cluster-scoped resources.
*/}}
{{- define "atlas-operator.rules" -}}
{{- if eq .Values.rbac.scope "cluster" }}
  # kopf: discover custom resources as they come and go (cluster-scoped, so not in the
  # namespaced Roles: kopf then discovers them once, at startup).
  - apiGroups: [apiextensions.k8s.io]
    resources: [customresourcedefinitions]
    verbs: [list, watch]
{{- end }}
  # kopf: Events for handler outcomes; the operator: InvalidSpec, rollout, trainer events.
  - apiGroups: [""]
    resources: [events]
    verbs: [create]
  {{- if and .Values.peering.enabled (eq .Values.rbac.scope "cluster") }}
  # kopf peering: heartbeats of the replicas, so only one is active.
  - apiGroups: [kopf.dev]
    resources: [clusterkopfpeerings]
    verbs: [get, list, watch, patch]
  {{- end }}
  # The endpoints: watched and annotated by kopf, read and status-patched by the operator.
  - apiGroups: [atlas.ai]
    resources: [atlasendpoints]
    verbs: [get, list, watch, patch]
  # Children carry ownerReferences with blockOwnerDeletion: true. Where the OwnerReferences
  # admission plugin is on (OpenShift, hardened clusters), setting that needs `update` on
  # the owner's finalizers subresource, else creating a child is Forbidden.
  - apiGroups: [atlas.ai]
    resources: [atlasendpoints/finalizers]
    verbs: [update]
  # get/patch on status is also what the operator grants each trainer (RBAC lets it grant
  # only what it holds).
  - apiGroups: [atlas.ai]
    resources: [atlasendpoints/status]
    verbs: [get, patch]
  # Serving pods: watched to follow readiness.
  - apiGroups: [apps]
    resources: [deployments]
    verbs: [get, list, watch, create, patch]
  # Trainer rounds: recreated after each round or failure.
  - apiGroups: [batch]
    resources: [jobs]
    verbs: [get, list, watch, create, patch, delete]
  # The rest of the children: applied idempotently (read, create, patch).
  - apiGroups: [""]
    resources: [configmaps, persistentvolumeclaims]
    verbs: [get, create, patch]
  # The trainer's Service and identity (and the Services of serving): also deleted when
  # trainer.enabled turns false, only those the endpoint controls.
  - apiGroups: [""]
    resources: [services, serviceaccounts]
    verbs: [get, create, patch, delete]
  - apiGroups: [rbac.authorization.k8s.io]
    resources: [roles, rolebindings]
    verbs: [get, create, patch, delete]
  # The trainer's ingress fence (only the endpoint's serving pods reach its ingest port).
  - apiGroups: [networking.k8s.io]
    resources: [networkpolicies]
    verbs: [get, create, patch, delete]
  # Serving pods' container readiness, to tell whether SGLang or the sidecar lags.
  - apiGroups: [""]
    resources: [pods]
    verbs: [list]
{{- end }}

{{/*
The namespaces the operator watches with rbac.scope=namespace (default: the release's).
*/}}
{{- define "atlas-operator.watchNamespaces" -}}
{{- if .Values.rbac.namespaces }}{{ join "," .Values.rbac.namespaces }}{{ else }}{{ .Release.Namespace }}{{ end }}
{{- end }}

{{/*
Refuse values that cannot work.
*/}}
{{- define "atlas-operator.validate" -}}
{{- if not (has .Values.rbac.scope (list "cluster" "namespace")) }}
{{- fail (printf "rbac.scope must be cluster or namespace, not %q" .Values.rbac.scope) }}
{{- end }}
{{- if and (eq .Values.rbac.scope "namespace") .Values.peering.enabled }}
{{- fail "rbac.scope=namespace needs peering.enabled=false (and one replica): kopf peering is cluster-scoped (ClusterKopfPeering)" }}
{{- end }}
{{- end }}

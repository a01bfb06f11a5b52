"""ATLAS operator: reconciles AtlasEndpoint custom resources into serving workloads.

The contract between the operator, the sidecars and the trainer (names are kept here so
that every module, the chart and the docs agree) is described in operator/README.md.
"""

GROUP = "atlas.ai"
VERSION = "v1alpha1"
KIND = "AtlasEndpoint"
PLURAL = "atlasendpoints"
SINGULAR = "atlasendpoint"
SHORT_NAMES = ["ae"]
API_VERSION = f"{GROUP}/{VERSION}"
CRD_NAME = f"{PLURAL}.{GROUP}"

# The trainer reports a new weight version through either of these (the annotation wins).
PUBLISHED_VERSION_ANNOTATION = f"{GROUP}/published-version"
# The operator remembers what it applied to each child, so it patches only on real changes
# and can null out fields that were removed from the spec (a JSON merge patch cannot).
LAST_APPLIED_ANNOTATION = f"{GROUP}/last-applied"

# Keys of the rollout ConfigMap that the sidecars read (mounted at ROLLOUT_MOUNT_PATH).
WEIGHT_VERSION_KEY = "weight-version"
CANARY_VERSION_KEY = "canary-version"
CANARY_FRACTION_KEY = "canary-fraction"
ROLLOUT_MOUNT_PATH = "/etc/atlas/rollout"

MANAGED_BY = "atlas-operator"

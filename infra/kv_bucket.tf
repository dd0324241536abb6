# Optional: a Cloud Storage bucket as the workers' shared KV tier (var.enable_kv_bucket), instead
# of the in-cluster cache Redis (k8s/base/redis-kv.yaml). The workers reach it through fsspec
# (gcsfs, in the worker images) at WORKER_KV_SHARED_URL = output kv_shared_url; private nodes
# reach it through the subnet's Private Google Access. infra/DEPLOYMENT.md, "KV tiers".
locals {
  kv_bucket_name = var.kv_bucket_name != "" ? var.kv_bucket_name : "${var.project_id}-${var.cluster_name}-kv"
  # The worker pods' Kubernetes service account (k8s/base/serviceaccount.yaml), as a Workload
  # Identity principal: no Google service account, no key, no annotation on the manifests.
  kv_worker_service_account = "kvcache-worker"
}

data "google_project" "current" {
  count = var.enable_kv_bucket ? 1 : 0
}

resource "google_storage_bucket" "kv" {
  #checkov:skip=CKV_GCP_78:A cache: versioning would keep every overwritten or expired chunk (and bill it).
  #checkov:skip=CKV_GCP_62:A cache of KV read and written on every turn: access logs would cost more than the data; Cloud Audit Logs cover administration.
  count                       = var.enable_kv_bucket ? 1 : 0
  name                        = local.kv_bucket_name
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  # Only cached KV is kept here: `terraform destroy` deletes the bucket with its objects.
  force_destroy = true
  labels        = var.labels

  # Chunks older than the TTL go, as the workers' own sweep does (WORKER_KV_SHARED_TTL_S =
  # kv_ttl_days * 86400). Lifecycle actions run asynchronously, within about a day.
  lifecycle_rule {
    condition {
      age = var.kv_ttl_days
    }
    action {
      type = "Delete"
    }
  }

  # A deleted chunk is not kept for the default 7 days of soft delete (and billed meanwhile).
  soft_delete_policy {
    retention_duration_seconds = 0
  }
}

# Object read/write/delete/list on this bucket only, for the worker pods only.
resource "google_storage_bucket_iam_member" "kv_workers" {
  count  = var.enable_kv_bucket ? 1 : 0
  bucket = google_storage_bucket.kv[0].name
  role   = "roles/storage.objectUser"
  member = "principal://iam.googleapis.com/projects/${data.google_project.current[0].number}/locations/global/workloadIdentityPools/${var.project_id}.svc.id.goog/subject/ns/${var.k8s_namespace}/sa/${local.kv_worker_service_account}"
}

# Images pushed by scripts/build_images.sh:
#   <region>-docker.pkg.dev/<project>/kvcache/{coordinator,gateway,worker,worker-cuda}
resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:Google-managed encryption is enough for public-model serving images; set kms_key_name to use a customer-managed key.
  location      = var.region
  repository_id = "kvcache"
  description   = "kvcache service images"
  format        = "DOCKER"
  labels        = var.labels

  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 10
    }
  }
}

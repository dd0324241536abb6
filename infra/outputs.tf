output "cluster_name" {
  description = "Name of the GKE cluster."
  value       = google_container_cluster.kvcache.name
}

output "zone" {
  description = "Zone of the cluster."
  value       = google_container_cluster.kvcache.location
}

output "get_credentials_command" {
  description = "Points kubectl at the cluster."
  value       = "gcloud container clusters get-credentials ${google_container_cluster.kvcache.name} --zone ${var.zone} --project ${var.project_id}"
}

output "image_registry" {
  description = "Docker registry prefix for scripts/build_images.sh and scripts/deploy_gke.sh."
  value       = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}

output "workload_identity_pool" {
  description = "Workload Identity pool; the pods' Kubernetes service account is kvcache/kvcache (the workers': kvcache/kvcache-worker)."
  value       = "${var.project_id}.svc.id.goog"
}

output "k8s_overlay" {
  description = "The k8s/overlays directory that matches the worker pool."
  value       = var.enable_gpu ? "gpu" : "cpu"
}

output "memorystore_host" {
  description = "Memorystore's private address (when use_memorystore); the AUTH string is `gcloud redis instances get-auth-string`."
  value       = var.use_memorystore ? google_redis_instance.sessions[0].host : null
}

output "memorystore_port" {
  description = "Memorystore's port (when use_memorystore)."
  value       = var.use_memorystore ? google_redis_instance.sessions[0].port : null
}

output "kv_bucket" {
  description = "The shared KV tier's bucket (when enable_kv_bucket)."
  value       = var.enable_kv_bucket ? google_storage_bucket.kv[0].name : null
}

output "kv_shared_url" {
  description = "The workers' WORKER_KV_SHARED_URL for the bucket (when enable_kv_bucket); see infra/DEPLOYMENT.md, \"KV tiers\"."
  value       = var.enable_kv_bucket ? "gs://${google_storage_bucket.kv[0].name}/kv" : null
}

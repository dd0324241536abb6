# Optional: Memorystore for Redis as the session store (var.use_memorystore). Reached over the
# cluster's VPC (private service access) with AUTH on. Point the workers'
# WORKER_SESSION_STORE_URL at it (infra/DEPLOYMENT.md, "Session store").
resource "google_compute_global_address" "memorystore" {
  count         = var.use_memorystore ? 1 : 0
  name          = "${var.cluster_name}-memorystore-range"
  purpose       = "VPC_PEERING"
  address_type  = "INTERNAL"
  prefix_length = 24
  network       = google_compute_network.vpc.id
}

resource "google_service_networking_connection" "memorystore" {
  count                   = var.use_memorystore ? 1 : 0
  network                 = google_compute_network.vpc.id
  service                 = "servicenetworking.googleapis.com"
  reserved_peering_ranges = [google_compute_global_address.memorystore[0].name]
}

resource "google_redis_instance" "sessions" {
  #checkov:skip=CKV_GCP_97:In-transit TLS needs Memorystore's CA in the worker's Redis client, which WORKER_SESSION_STORE_URL cannot carry yet; traffic stays in the VPC and needs AUTH
  count                   = var.use_memorystore ? 1 : 0
  name                    = "${var.cluster_name}-sessions"
  tier                    = var.memorystore_tier
  memory_size_gb          = var.memorystore_memory_size_gb
  region                  = var.region
  redis_version           = "REDIS_7_2"
  authorized_network      = google_compute_network.vpc.id
  connect_mode            = "PRIVATE_SERVICE_ACCESS"
  auth_enabled            = true
  transit_encryption_mode = "DISABLED"
  # Memorystore's default, volatile-lru, would evict sessions (every one has a TTL) when full:
  # refuse writes instead, as the in-cluster session store does (k8s/base/redis.yaml).
  redis_configs = {
    "maxmemory-policy" = "noeviction"
  }
  persistence_config {
    persistence_mode    = "RDB"
    rdb_snapshot_period = "ONE_HOUR"
  }
  labels     = var.labels
  depends_on = [google_service_networking_connection.memorystore]
}

locals {
  node_oauth_scopes = ["https://www.googleapis.com/auth/cloud-platform"]
}

# Gateway and coordinator (k8s label kvcache-pool=general).
resource "google_container_node_pool" "general" {
  name     = "general"
  cluster  = google_container_cluster.kvcache.id
  location = var.zone

  autoscaling {
    min_node_count = var.general_min_nodes
    max_node_count = var.general_max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.general_machine_type
    image_type      = "COS_CONTAINERD"
    disk_type       = "pd-balanced"
    disk_size_gb    = 50
    service_account = google_service_account.nodes.email
    oauth_scopes    = local.node_oauth_scopes
    tags            = [local.node_tag]
    resource_labels = var.labels
    labels = {
      kvcache-pool = "general"
    }
    metadata = {
      disable-legacy-endpoints = "true"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
  }
}

# Workers (k8s label kvcache-pool=worker): CPU machines, or one GPU per node with enable_gpu.
# GKE installs the NVIDIA driver and taints GPU nodes nvidia.com/gpu=present:NoSchedule.
resource "google_container_node_pool" "worker" {
  name     = var.enable_gpu ? "worker-gpu" : "worker-cpu"
  cluster  = google_container_cluster.kvcache.id
  location = var.zone

  autoscaling {
    min_node_count = var.worker_min_nodes
    max_node_count = var.worker_max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.enable_gpu ? var.gpu_machine_type : var.worker_machine_type
    image_type      = "COS_CONTAINERD"
    disk_type       = "pd-balanced"
    disk_size_gb    = var.enable_gpu ? 100 : 50
    service_account = google_service_account.nodes.email
    oauth_scopes    = local.node_oauth_scopes
    tags            = [local.node_tag]
    resource_labels = var.labels
    labels = {
      kvcache-pool = "worker"
    }
    metadata = {
      disable-legacy-endpoints = "true"
    }

    dynamic "guest_accelerator" {
      for_each = var.enable_gpu ? [var.gpu_type] : []
      content {
        type  = guest_accelerator.value
        count = 1
        gpu_driver_installation_config {
          gpu_driver_version = "LATEST"
        }
      }
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
  }
}

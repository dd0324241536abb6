variable "project_id" {
  description = "GCP project that holds the cluster, network and image registry."
  type        = string
}

variable "region" {
  description = "Region of the subnet, Cloud NAT and Artifact Registry repository."
  type        = string
  default     = "us-central1"
}

variable "zone" {
  description = "Zone of the (zonal) cluster and its node pools; must offer var.gpu_type when enable_gpu is true."
  type        = string
  default     = "us-central1-a"
}

variable "cluster_name" {
  description = "Name of the GKE cluster; also prefixes the network, node service account and firewall rules."
  type        = string
  default     = "kvcache"
}

variable "release_channel" {
  description = "GKE release channel: RAPID, REGULAR or STABLE."
  type        = string
  default     = "REGULAR"

  validation {
    condition     = contains(["RAPID", "REGULAR", "STABLE"], var.release_channel)
    error_message = "release_channel must be RAPID, REGULAR or STABLE."
  }
}

variable "subnet_cidr" {
  description = "Primary range of the node subnet."
  type        = string
  default     = "10.10.0.0/20"
}

variable "pods_cidr" {
  description = "Secondary range for pod IPs (VPC-native cluster)."
  type        = string
  default     = "10.20.0.0/14"
}

variable "services_cidr" {
  description = "Secondary range for Service cluster IPs."
  type        = string
  default     = "10.24.0.0/20"
}

variable "enable_private_nodes" {
  description = "Nodes get no public IP; Cloud NAT gives them outbound access (model downloads)."
  type        = bool
  default     = true
}

variable "master_ipv4_cidr_block" {
  description = "/28 range for the control plane's private endpoint (private nodes only)."
  type        = string
  default     = "172.16.0.0/28"
}

variable "master_authorized_networks" {
  description = "CIDR blocks allowed to reach the control plane; empty leaves it open to any address (credentials still required)."
  type = list(object({
    cidr_block   = string
    display_name = string
  }))
  default = []
}

variable "general_machine_type" {
  description = "Machine type of the general pool (gateway, coordinator)."
  type        = string
  default     = "e2-standard-4"
}

variable "general_min_nodes" {
  description = "Autoscaling lower bound of the general pool."
  type        = number
  default     = 1
}

variable "general_max_nodes" {
  description = "Autoscaling upper bound of the general pool."
  type        = number
  default     = 3
}

variable "enable_gpu" {
  description = "Worker pool on GPU nodes (var.gpu_machine_type with one var.gpu_type each) instead of CPU nodes; deploy the k8s gpu overlay to match."
  type        = bool
  default     = false
}

variable "worker_machine_type" {
  description = "Machine type of the worker pool when enable_gpu is false."
  type        = string
  default     = "e2-standard-8"
}

variable "gpu_machine_type" {
  description = "Machine type of the worker pool when enable_gpu is true (T4 GPUs attach to N1 machines)."
  type        = string
  default     = "n1-standard-4"
}

variable "gpu_type" {
  description = "Accelerator attached to each GPU worker node; the k8s gpu overlay selects nvidia-tesla-t4."
  type        = string
  default     = "nvidia-tesla-t4"
}

variable "worker_min_nodes" {
  description = "Autoscaling lower bound of the worker pool."
  type        = number
  default     = 1
}

variable "worker_max_nodes" {
  description = "Autoscaling upper bound of the worker pool."
  type        = number
  default     = 4
}

variable "lb_source_ranges" {
  description = "Client ranges allowed to reach the gateway's load balancer on port 80."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "deletion_protection" {
  description = "Refuse `terraform destroy` of the cluster while true."
  type        = bool
  default     = false
}

variable "labels" {
  description = "Labels put on the cluster and its nodes."
  type        = map(string)
  default     = { app = "kvcache" }
}

variable "use_memorystore" {
  description = "Create a Memorystore for Redis instance as the session store instead of the in-cluster Redis StatefulSet (k8s/base/redis.yaml)."
  type        = bool
  default     = false
}

variable "memorystore_tier" {
  description = "BASIC (one node) or STANDARD_HA (a replica with automatic failover)."
  type        = string
  default     = "STANDARD_HA"

  validation {
    condition     = contains(["BASIC", "STANDARD_HA"], var.memorystore_tier)
    error_message = "memorystore_tier must be BASIC or STANDARD_HA."
  }
}

variable "memorystore_memory_size_gb" {
  description = "Memorystore capacity in GiB (token ids: about 4 bytes per token of every live conversation)."
  type        = number
  default     = 1

  validation {
    condition     = var.memorystore_memory_size_gb >= 1 && var.memorystore_memory_size_gb <= 300
    error_message = "memorystore_memory_size_gb must be between 1 and 300."
  }
}

variable "enable_kv_bucket" {
  description = "Create a Cloud Storage bucket for the workers' shared KV tier (WORKER_KV_SHARED_URL = output kv_shared_url) instead of the in-cluster cache Redis (k8s/base/redis-kv.yaml)."
  type        = bool
  default     = false
}

variable "k8s_namespace" {
  description = "Kubernetes namespace of the deployment (scripts/deploy_gke.sh --namespace); the bucket's Workload Identity grant names the workers' service account in it."
  type        = string
  default     = "kvcache"
}

variable "kv_bucket_name" {
  description = "Name of the shared KV tier's bucket (globally unique); empty: <project_id>-<cluster_name>-kv."
  type        = string
  default     = ""
}

variable "kv_ttl_days" {
  description = "The bucket deletes KV chunks this many days after they were written; set the workers' WORKER_KV_SHARED_TTL_S to the same time (days * 86400)."
  type        = number
  default     = 1

  validation {
    condition     = var.kv_ttl_days >= 1 && floor(var.kv_ttl_days) == var.kv_ttl_days
    error_message = "kv_ttl_days must be a whole number of days, at least 1 (a lifecycle rule's age is in days)."
  }
}

resource "google_compute_network" "vpc" {
  name                    = "${var.cluster_name}-vpc"
  auto_create_subnetworks = false
  routing_mode            = "REGIONAL"
}

resource "google_compute_subnetwork" "nodes" {
  name                     = "${var.cluster_name}-nodes"
  region                   = var.region
  network                  = google_compute_network.vpc.id
  ip_cidr_range            = var.subnet_cidr
  private_ip_google_access = true

  secondary_ip_range {
    range_name    = "pods"
    ip_cidr_range = var.pods_cidr
  }

  secondary_ip_range {
    range_name    = "services"
    ip_cidr_range = var.services_cidr
  }

  log_config {
    aggregation_interval = "INTERVAL_5_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

# Private nodes have no public IP: Cloud NAT lets workers download models from the Hugging Face
# hub. Images come from Artifact Registry through Private Google Access.
resource "google_compute_router" "nat" {
  count   = var.enable_private_nodes ? 1 : 0
  name    = "${var.cluster_name}-router"
  region  = var.region
  network = google_compute_network.vpc.id
}

resource "google_compute_router_nat" "nat" {
  count                              = var.enable_private_nodes ? 1 : 0
  name                               = "${var.cluster_name}-nat"
  region                             = var.region
  router                             = google_compute_router.nat[0].name
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "ALL_SUBNETWORKS_ALL_IP_RANGES"

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}

# The gateway's Service is an external passthrough load balancer: packets keep the client's
# address and arrive at the nodes on the Service port. GKE also writes rules of its own for
# each LoadBalancer Service; these keep the path open where that is turned off (Shared VPC).
resource "google_compute_firewall" "gateway_lb" {
  #checkov:skip=CKV_GCP_106:The gateway is the public HTTP endpoint; narrow var.lb_source_ranges to restrict it.
  name          = "${var.cluster_name}-allow-gateway-lb"
  network       = google_compute_network.vpc.id
  direction     = "INGRESS"
  source_ranges = var.lb_source_ranges
  target_tags   = [local.node_tag]

  allow {
    protocol = "tcp"
    ports    = ["80"]
  }
}

# Google's load balancer health checkers probe kube-proxy's health port and the node ports.
resource "google_compute_firewall" "lb_health_checks" {
  name          = "${var.cluster_name}-allow-lb-health-checks"
  network       = google_compute_network.vpc.id
  direction     = "INGRESS"
  source_ranges = ["35.191.0.0/16", "130.211.0.0/22", "209.85.152.0/22", "209.85.204.0/22"]
  target_tags   = [local.node_tag]

  allow {
    protocol = "tcp"
    ports    = ["10256", "30000-32767"]
  }
}

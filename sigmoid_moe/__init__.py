"""sigmoid-moe: sigmoid-gated MoE routing with auxiliary-loss-free bias correction."""

from sigmoid_moe.balancing import BIAS_RULES, expert_load, update_bias
from sigmoid_moe.config import MoEConfig, RouterConfig
from sigmoid_moe.dispatch import Dispatched, capacity_moe, dropless_moe
from sigmoid_moe.expert_parallel import ExpertParallelOut, expert_parallel_moe
from sigmoid_moe.interop import from_hf_deepseek_v3_moe, to_hf_deepseek_v3_moe
from sigmoid_moe.layer import PARAM_AXES, MoEAux, MoELayer
from sigmoid_moe.losses import (
    global_batch_balance_loss,
    load_balancing_loss,
    router_probs,
    router_z_loss,
    sequence_balance_loss,
)
from sigmoid_moe.metrics import (
    LoadStats,
    coefficient_of_variation,
    idle_experts,
    load_fraction,
    load_stats,
    max_violation,
    uniform_maxvio_approx,
    uniform_maxvio_floor,
)
from sigmoid_moe.routing import Routing, route, sigmoid_moe_router
from sigmoid_moe.routing_bias import (
    ExpertLoad,
    RoutingBias,
    apply_routing_bias_update,
    routing_bias_update,
)
from sigmoid_moe.sharding import (
    DEFAULT_RULES,
    MeshConfig,
    logical_sharding,
    make_mesh,
    rules_for_mesh,
    validate_mesh,
)
from sigmoid_moe.topk import top_k

__version__ = "0.1.0"

__all__ = [
    "BIAS_RULES",
    "DEFAULT_RULES",
    "Dispatched",
    "ExpertLoad",
    "ExpertParallelOut",
    "LoadStats",
    "MeshConfig",
    "MoEAux",
    "MoEConfig",
    "MoELayer",
    "PARAM_AXES",
    "RouterConfig",
    "Routing",
    "RoutingBias",
    "apply_routing_bias_update",
    "capacity_moe",
    "coefficient_of_variation",
    "dropless_moe",
    "expert_load",
    "expert_parallel_moe",
    "from_hf_deepseek_v3_moe",
    "global_batch_balance_loss",
    "idle_experts",
    "load_balancing_loss",
    "load_fraction",
    "load_stats",
    "logical_sharding",
    "make_mesh",
    "max_violation",
    "route",
    "router_probs",
    "router_z_loss",
    "routing_bias_update",
    "rules_for_mesh",
    "sequence_balance_loss",
    "sigmoid_moe_router",
    "to_hf_deepseek_v3_moe",
    "top_k",
    "uniform_maxvio_approx",
    "uniform_maxvio_floor",
    "update_bias",
    "validate_mesh",
]

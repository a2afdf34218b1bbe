"""Compression methods. Each family's ``stages`` module defines its recipe stages (options, scope, the statistics
they need) and registers them; importing this package registers every built-in stage type. The stage modules are
torch-free; each stage's solve loads its algorithm when it runs."""

from lmshrink.methods.actquant import stages as actquant_stages
from lmshrink.methods.lowrank import stages as lowrank_stages
from lmshrink.methods.prune import stages as prune_stages
from lmshrink.methods.quant import stages as quant_stages
from lmshrink.methods.recover import stage as recover_stage
from lmshrink.methods.structured import stages as structured_stages

__all__ = ["actquant_stages", "lowrank_stages", "prune_stages", "quant_stages", "recover_stage", "structured_stages"]

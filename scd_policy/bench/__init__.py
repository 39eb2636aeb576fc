"""``scd-bench``: latency, throughput, context-length and training-speed benchmarks of the three policies.

Every measurement goes through the code a user runs: per-control-step latency through the streaming
``PolicyRuntime.step()``, training speed through ``compute_loss`` + backward + AdamW. Policies of one
size preset have parameter counts within 10% of each other. Measurements of a setting are interleaved
(round-robin over the policies, many rounds) so that every ratio comes from the same stretch of machine
time; weights are untrained (random), which does not change the cost of a forward pass.
"""

from scd_policy.bench.config import SUITES, BenchConfig
from scd_policy.bench.report import write_report
from scd_policy.bench.suites import run_suites

__all__ = ["SUITES", "BenchConfig", "run_suites", "write_report"]

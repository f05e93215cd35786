"""Every metric dflash-ray exports, defined once: name, kind, help, labels, buckets.

Names follow vLLM's (`vllm:spec_decode_num_drafts` -> `dflash_spec_decode_num_drafts`), so its
PromQL ports by rename. Exported through Ray's metrics agent (the Serve app) a name gains Ray's
`ray_` prefix and a counter the `_total` suffix: `ray_dflash_spec_decode_num_drafts_total`;
through `prometheus_client` (offline engines, `dflash-ray bench --metrics-port`) the prefix is
absent: `dflash_spec_decode_num_drafts_total`. `exported_name` spells both.

Every metric carries the labels `model_name` and `replica`, plus its own (`position`,
`finished_reason`, `kind`, `cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "dflash_"
COMMON_LABELS = ("model_name", "replica")

# seconds: from a few ms (CPU steps, TTFT of a short prompt) to minutes (long requests)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                0.1, 0.2, 0.5, 1.0)
ACCEPTANCE_BUCKETS = tuple(float(x) for x in range(1, 17)) + (24.0, 32.0)
BYTES_BUCKETS = tuple(float(1 << k) for k in range(10, 31, 2))


@dataclass(frozen=True, slots=True)
class Metric:
    name: str  # without PREFIX
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def full_name(self) -> str:
        return PREFIX + self.name

    def exported_name(self, ray: bool = True) -> str:
        """The series name Prometheus sees (histograms add _bucket / _sum / _count)."""
        name = ("ray_" if ray else "") + self.full_name
        return name + "_total" if self.kind == "counter" else name


def _c(name, help, labels=()):
    return Metric(name, "counter", help, labels)


def _g(name, help, labels=()):
    return Metric(name, "gauge", help, labels)


def _h(name, help, buckets):
    return Metric(name, "histogram", help, (), buckets)


METRICS = {m.name: m for m in [
    # speculation (vLLM's spec_decode_* counters); acceptance length = 1 + accepted / drafts
    _c("spec_decode_num_drafts", "Verify steps of a request that carried drafts"),
    _c("spec_decode_num_draft_tokens", "Draft tokens proposed for verification"),
    _c("spec_decode_num_accepted_tokens", "Draft tokens accepted and committed to the output"),
    _c("spec_decode_num_accepted_tokens_per_pos",
       "Accepted draft tokens by position in the block (0 = first draft)", ("position",)),
    _h("request_acceptance_length",
       "Per finished request: tokens committed per verify step with drafts",
       ACCEPTANCE_BUCKETS),
    _c("engine_steps", "Engine steps, by kind: spec (some block verified drafts) or plain",
       ("kind",)),
    _g("spec_decode_enabled", "1 while the speculation policy speculates, else 0"),
    # tokens and requests
    _c("prompt_tokens", "Prompt tokens of requests, counted at their first output token"),
    _c("generation_tokens", "Tokens generated (every output token)"),
    _c("request_success", "Finished requests by finish reason", ("finished_reason",)),
    _g("num_requests_running", "Requests in the running batch"),
    _g("num_requests_waiting", "Requests waiting for admission (new or preempted)"),
    _c("num_preemptions", "Preemptions (a sequence's KV dropped, recomputed later)"),
    _g("kv_cache_usage_perc", "Share of KV blocks in use (0-1)", ("cache",)),
    # latency
    _h("time_to_first_token_seconds", "Arrival to first output token", LATENCY_BUCKETS),
    _h("inter_token_latency_seconds", "Time between output tokens (a delta's gap over its "
       "tokens)", LATENCY_BUCKETS),
    _h("e2e_request_latency_seconds", "Arrival to finish", LATENCY_BUCKETS),
    _h("request_queue_time_seconds", "Arrival to first admitted to a step", LATENCY_BUCKETS),
    # step costs
    _h("draft_step_seconds", "Drafter pass of a step that drafted", STEP_BUCKETS),
    _h("verify_step_seconds", "Target verify pass of a step", STEP_BUCKETS),
    _h("hidden_state_transfer_seconds",
       "Tensors crossing between the drafter and target processes, per step", STEP_BUCKETS),
    _c("hidden_state_transfer_bytes", "Bytes of tensors crossing between processes"),
    # drafter health
    _g("drafter_up", "1 while a drafter is connected, else 0"),
    _c("drafter_fallbacks", "Drafter losses: live requests went on with plain decoding"),
    _c("drafter_restarts", "A drafter came (back) up after being down"),
]}

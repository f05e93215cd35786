"""The `fuzz` section: schemathesis draws requests from the server's own /openapi.json (bodies
that fit the schema and bodies that do not) and the suite counts the answers; every 5xx is a
defect (target 0). Runs in a thread: hypothesis and schemathesis are synchronous."""

from __future__ import annotations

import math
import time
from collections import Counter

import httpx
from common import Server

SKIP = {"/docs", "/redoc", "/docs/oauth2-redirect", "/openapi.json"}


def call_case(op, server: Server, session, timeout_s: float, seen: Counter,
              failures: list[str], name: str, n: int):
    """A hypothesis test calling the server with `n` cases of `op`, counting the statuses."""
    import requests
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy())
    def call(case):
        try:
            r = case.call(base_url=server.url, session=session, headers=server.headers,
                          timeout=timeout_s)
            code = r.status_code
        except requests.RequestException as exc:
            code = 0
            failures.append(f"{name}: {type(exc).__name__}")
        seen[code] += 1
        if code >= 500 and len(failures) < 20:
            failures.append(f"{name} -> {code}: {r.text[:200]}")

    return call


def fuzz(server: Server, cases: int = 1000, timeout_s: float = 60.0) -> dict:
    import requests
    import schemathesis

    raw = httpx.get(f"{server.url}/openapi.json", headers=server.headers, timeout=30)
    raw.raise_for_status()
    schema = schemathesis.openapi.from_dict(raw.json())
    ops = [r.ok() for r in schema.get_all_operations()]
    ops = [op for op in ops if op.path not in SKIP]
    with_body = [op for op in ops if op.method.upper() == "POST"]
    per_body_op = math.ceil(cases / max(len(with_body), 1))  # the GETs' few cases come on top
    statuses, per_op, failures = Counter(), {}, []
    session = requests.Session()
    start = time.perf_counter()
    for op in ops:
        n = per_body_op if op in with_body else 5
        seen, name = Counter(), f"{op.method.upper()} {op.path}"
        call_case(op, server, session, timeout_s, seen, failures, name, n)()
        statuses += seen
        per_op[name] = sum(seen.values())
    total = sum(statuses.values())
    return {"cases": total, "per_operation": per_op,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "http_5xx": sum(v for k, v in statuses.items() if k >= 500),
            "no_answer": statuses.get(0, 0), "failures": failures,
            "seconds": round(time.perf_counter() - start, 1)}

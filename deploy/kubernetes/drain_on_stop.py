"""preStop hook of an inference worker pod: drain this node, then wait for its last batch.

``POST $IMGSVC_URL/api/v1/admin/workers/worker@$HOSTNAME/drain`` (with ADMIN_TOKEN) makes the node
stop consuming its queues and its children stop taking extra messages for a batch; then the hook
polls ``GET /api/v1/admin/workers`` until no child of the node has a batch running, for at most
DRAIN_WAIT_S. Kubernetes sends SIGTERM when the hook returns, and Celery's warm shutdown puts back
anything still reserved. Whatever fails here (web unreachable, node unknown), the hook still returns
and SIGTERM still comes: the drain only shortens what redelivery would otherwise do.
"""
import json
import os
import sys
import time
import urllib.error
import urllib.request

POLL_S = 2.0


def call(method: str, path: str) -> dict:
    request = urllib.request.Request(f"{os.environ['IMGSVC_URL'].rstrip('/')}/api/v1/admin/{path}", method=method,
                                     headers={"Authorization": f"Bearer {os.environ['ADMIN_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=20) as answer:
        return json.load(answer)


def busy_children(node: str) -> int | None:
    """Children of ``node`` with a batch running, or None once the node is gone from the live list."""
    for worker in call("GET", "workers")["workers"]:
        if worker["name"] == node:
            return sum(1 for child in worker["children"] if child.get("current_batch"))
    return None


def main() -> int:
    node = f"worker@{os.environ['HOSTNAME']}"
    deadline = time.monotonic() + float(os.environ.get("DRAIN_WAIT_S", "190"))
    try:
        call("POST", f"workers/{node}/drain")
        print(f"drained {node}; waiting for its last batch", flush=True)
        while time.monotonic() < deadline:
            if not busy_children(node):
                print(f"{node} is idle", flush=True)
                return 0
            time.sleep(POLL_S)
        print(f"{node} still busy after DRAIN_WAIT_S; stopping anyway", flush=True)
    except (OSError, ValueError, KeyError) as exc:  # urllib's errors are OSErrors
        print(f"could not drain {node}: {exc}; stopping anyway", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

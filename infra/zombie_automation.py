"""Create (or replace) the automation that marks "zombie" flow runs Crashed.

A worker or machine that dies mid-run leaves its flow run RUNNING, holding its deployment's concurrency slot
(prefect.yaml: one nightly run at a time), and nothing tells the server. With ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``
set on the workers (60 s in infra/docker-compose.yml), a running flow run emits ``prefect.flow-run.heartbeat`` events;
this automation turns a run whose heartbeats stop for ``--grace`` seconds (default: three missed beats) into Crashed.
A re-run of the same recipe then serves every stage the dead run finished from the cache.

    export PREFECT_API_URL=http://127.0.0.1:4200/api
    export PREFECT_API_AUTH_STRING=USER:PASSWORD   # the stack's server asks for PREFECT_AUTH_STRING of infra/.env
    python infra/zombie_automation.py [--grace 180]
"""

from __future__ import annotations

import argparse
import contextlib
from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

NAME = "mergeflow: crash zombie flow runs"


def automation(grace: float) -> Automation:
    """After a heartbeat, expect another heartbeat or a final state within ``grace`` seconds, per flow run."""
    return Automation(
        name=NAME,
        description="Marks a flow run Crashed when its heartbeats stop (worker or machine died).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=grace),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {grace:.0f} s: the worker or its machine died")],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grace", type=float, default=180.0, help="seconds without a heartbeat (default 180)")
    args = parser.parse_args(argv)
    with contextlib.suppress(ValueError):  # ValueError: none yet
        Automation.read(name=NAME).delete()
    created = automation(args.grace).create()
    print(f"created automation {created.name!r} ({created.id})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

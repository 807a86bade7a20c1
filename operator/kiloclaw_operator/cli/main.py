"""kubectl kiloclaw — what is broken, why, and what to do about it, for KiloClaw instances.

  kubectl kiloclaw list                     every instance, one line each; "!" marks those that need you
  kubectl kiloclaw status NAME              the card: phase, conditions, Fly, recovery, retained, Events
  kubectl kiloclaw recoveries               recent recovery attempts across instances
  kubectl kiloclaw retained                 retained volumes with the time they have left
  kubectl kiloclaw retry NAME               ask for a new recovery attempt after a failed one
  kubectl kiloclaw retained delete NAME     delete a retained volume now (asks first; --yes skips)
  kubectl kiloclaw report NAME              a redacted bundle for a bug report (no token, no env values)
  kubectl kiloclaw brake                    the mass-failure brake: armed, engaged (paused), released
  kubectl kiloclaw rearm                    release an engaged brake: paused recoveries proceed

Options as in kubectl: --kubeconfig, --context, -n/--namespace, -A/--all-namespaces; -o json|yaml for scripts.

Exit codes: 0 done; 1 other API error; 2 bad command line; 3 no such instance or retained volume;
4 no kubeconfig, cluster unreachable or KiloClaw CRDs not installed; 5 unauthorized or forbidden;
6 confirmation declined.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import yaml

from .. import __version__
from ..brake import CHANGED_AT_ANNOTATION as BRAKE_CHANGED_AT
from ..brake import REASON_ANNOTATION as BRAKE_REASON
from ..brake import RELEASED as BRAKE_RELEASED
from ..brake import STATE_ANNOTATION as BRAKE_STATE
from ..models import INSTANCE_PLURAL, RETAINED_PLURAL, RETRY_ANNOTATION
from ..reasons import Reason
from . import views
from .api import EXIT_ABORTED, EXIT_OK, EXIT_USAGE, Api, PluginError

DEFAULT_METRICS_PATH = (
    "/api/v1/namespaces/kiloclaw-system/services/http:kiloclaw-operator-metrics:metrics/proxy/metrics"
)


def _now() -> datetime:
    return datetime.now(UTC)


# --- output ------------------------------------------------------------------------------------------------


def _emit(data: Any, output: str | None, human: Callable[[Any, TextIO], None], out: TextIO) -> None:
    if output == "json":
        json.dump(data, out, indent=2, default=str)
        out.write("\n")
    elif output == "yaml":
        yaml.safe_dump(json.loads(json.dumps(data, default=str)), out, sort_keys=False)
    else:
        human(data, out)


def _table(rows: list[list[str]], out: TextIO) -> None:
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() + "\n")


def _s(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _print_card(card: dict[str, Any], out: TextIO) -> None:
    w = out.write
    attention = card["attention"]
    w(
        f"Instance:     {card['namespace']}/{card['name']}   sandbox {card['sandboxId']}"
        f"   app {card['flyApp']}\n"
    )
    deleting = "   (being deleted)" if card["deleting"] else ""
    w(f"Phase:        {card['phase']}   (desired {card['desiredState']}){deleting}\n")
    w(f"Attention:    {'! ' + ', '.join(attention) if attention else 'none'}\n")
    fly = card["fly"]
    w(
        f"Fly:          state {_s(fly['state'])}   region {_s(fly['region'])}"
        f"   machine {_s(fly['machineId'])}   volume {_s(fly['volumeId'])}\n"
    )
    w("\nConditions:\n")
    _table(
        [["  TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"]]
        + [
            [f"  {c['type']}", _s(c["status"]), _s(c["reason"]), c["since"], c["message"] or ""]
            for c in card["conditions"]
        ],
        out,
    )
    rec = card["recovery"]
    if rec:
        w(f"\nRecovery in flight:  {rec.get('id')}\n")
        w(f"  step:      {rec.get('step')}\n")
        w(f"  started:   {rec.get('startedAt')} ({rec['started']})\n")
        w(f"  deadline:  {rec.get('deadline')} ({rec['deadlineIn']})\n")
        w(
            f"  source:    machine {_s(rec.get('sourceMachineId'))}  volume {_s(rec.get('sourceVolumeId'))}"
            f"  region {_s(rec.get('sourceRegion'))}\n"
        )
        w(
            f"  replacement: volume {_s(rec.get('replacementVolumeId'))}"
            f"  machine {_s(rec.get('replacementMachineId'))}\n"
        )
        if rec.get("source") == "Snapshot":
            w(
                f"  from:      snapshot {_s(rec.get('snapshotId'))} taken {_s(rec.get('snapshotCreatedAt'))}"
                " (the old volume's host is unreachable; writes since then are lost)\n"
            )
        elif rec.get("source"):
            w("  from:      a fork of the old volume (nothing lost)\n")
    else:
        w("\nRecovery in flight:  none\n")
    last = card["lastRecovery"]
    if last:
        duration = last.get("durationSeconds")
        took = f"{duration:.1f} s" if isinstance(duration, int | float) else "-"
        w(f"Last recovery:       {last.get('outcome')} {last['finished']}, took {took}, ")
        where = (
            f"{_s(last.get('fromRegion'))} → {last['toRegion']}"
            if last.get("toRegion")
            else f"stayed in {_s(last.get('fromRegion'))}"
        )
        w(f"{where}   ({last.get('id')})\n")
        if last.get("message"):
            w(f"  message:   {last['message']}\n")
        if last.get("source") == "Snapshot":
            loss = last.get("dataLossSeconds")
            window = views.duration(float(loss)) if isinstance(loss, int | float) else "-"
            w(f"  restored:  snapshot {_s(last.get('snapshotId'))}, data-loss window {window}\n")
        if last.get("retainedVolume"):
            w(f"  old volume kept as retained volume {last['retainedVolume']}\n")
    else:
        w("Last recovery:       none\n")
    cleanup = card["pendingCleanup"]
    if cleanup:
        w(
            f"Pending cleanup:     volume {_s(cleanup.get('volumeId'))}"
            f"  machine {_s(cleanup.get('machineId'))}"
            " (a failed recovery's replacement; retried by the operator)\n"
        )
    else:
        w("Pending cleanup:     none\n")
    w("\nRetained volumes:")
    if card["retainedVolumes"]:
        w("\n")
        _print_retained_rows(card["retainedVolumes"], out, indent="  ", with_instance=False)
    else:
        w("    none\n")
    w("\nEvents (oldest first):")
    if card["events"]:
        w("\n")
        _table(
            [["  AGE", "TYPE", "REASON", "OBJECT", "MESSAGE"]]
            + [[f"  {e['age']}", e["type"], e["reason"], e["object"], e["message"]] for e in card["events"]],
            out,
        )
    else:
        w("    none\n")
    if attention:
        w("\nWhat to do:\n")
        for hint in _hints(card):
            w(f"  - {hint}\n")


def _hints(card: dict[str, Any]) -> list[str]:
    name, ns = card["name"], card["namespace"]
    stalled = next((c for c in card["conditions"] if c["type"] == "Stalled" and c["status"] == "True"), None)
    hints: list[str] = []
    reason = (stalled or {}).get("reason")
    if reason == Reason.RECOVERY_FAILED:
        hints.append(
            "the recovery failed and the source volume is untouched; after fixing the cause "
            f"(message above), retry: kubectl kiloclaw retry {name} -n {ns}"
        )
    elif reason in (Reason.INVALID_SPEC, Reason.FLY_UNAUTHORIZED):
        hints.append(
            "Fly rejected the request: fix the spec (or the operator's Fly token); a new generation retries"
        )
    elif reason == Reason.DUPLICATE_SANDBOX:
        hints.append("another instance owns this sandbox: delete this one or give it its own sandboxId")
    elif reason == Reason.WAITING_FOR_SOURCE:
        hints.append(
            "the old volume's host is unreachable and no snapshot within spec.recovery.maxDataLossSeconds "
            "exists: the operator keeps looking and recovers by itself when the host returns or a snapshot "
            f"appears; to accept an older snapshot, raise it: kubectl patch kci {name} -n {ns} --type merge "
            """-p '{"spec":{"recovery":{"maxDataLossSeconds":N}}}'"""
        )
    elif reason == Reason.RECOVERY_PAUSED:
        hints.append(
            "the mass-failure brake paused new recoveries (many machines stopped at once); check Fly's "
            "status, then release it: kubectl kiloclaw rearm"
        )
    elif reason:
        hints.append(f"Stalled ({reason}): read the condition message and the Events above")
    for row in card["retainedVolumes"]:
        if row["phase"] == "Blocked":
            hints.append(
                f"retained volume {row['name']} cannot be deleted: {row['whyBlocked']}; the operator retries "
                f"({row['nextAttempt'] or 'soon'})"
            )
    if card["pendingCleanup"]:
        hints.append(
            "replacement resources of a failed recovery still exist on Fly; the operator retries them"
        )
    return hints


def _print_retained_rows(
    rows: list[dict[str, Any]], out: TextIO, *, indent: str = "", with_instance: bool = True
) -> None:
    header = ["NAMESPACE", "NAME"] + (["INSTANCE"] if with_instance else [])
    header += ["VOLUME", "REGION", "PHASE", "EXPIRES", "NEXT ATTEMPT", "WHY BLOCKED"]
    table = [[indent + header[0], *header[1:]]] if with_instance else [[indent + "NAME", *header[2:]]]
    for r in rows:
        expires = "deleting" if r["deleting"] or r["deleteNow"] else r["timeLeft"]
        cells = [_s(r["namespace"]), _s(r["name"])] + ([_s(r["instance"])] if with_instance else [])
        cells += [_s(r["volumeId"]), _s(r["region"]), _s(r["phase"]), expires, _s(r["nextAttempt"])]
        cells += [_s(r["whyBlocked"])]
        if not with_instance:
            cells = cells[1:]
        table.append([indent + cells[0], *cells[1:]])
    _table(table, out)


def _print_list(rows: list[dict[str, Any]], out: TextIO) -> None:
    if not rows:
        out.write("No KiloClaw instances found.\n")
        return
    _table(
        [["", "NAMESPACE", "NAME", "PHASE", "FLY-STATE", "REGION", "READY", "RECOVERY", "AGE", "ATTENTION"]]
        + [
            [
                "!" if r["attention"] else " ",
                _s(r["namespace"]),
                _s(r["name"]),
                _s(r["phase"]),
                _s(r["flyState"]),
                _s(r["region"]),
                _s(r["ready"]),
                r["recovery"],
                r["age"],
                ", ".join(r["attention"]) or "-",
            ]
            for r in rows
        ],
        out,
    )


def _print_recoveries(rows: list[dict[str, Any]], out: TextIO) -> None:
    if not rows:
        out.write("No recoveries found.\n")
        return
    _table(
        [["NAMESPACE", "INSTANCE", "RECOVERY", "OUTCOME", "STARTED", "DURATION", "MESSAGE"]]
        + [
            [
                _s(r["namespace"]),
                _s(r["instance"]),
                _s(r["id"]),
                _s(r["outcome"]) + (f" ({r['step']})" if r.get("step") else ""),
                r["age"],
                f"{r['durationSeconds']} s" if r["durationSeconds"] is not None else "-",
                r["message"] or "",
            ]
            for r in rows
        ],
        out,
    )


def _print_retained(rows: list[dict[str, Any]], out: TextIO) -> None:
    if not rows:
        out.write("No retained volumes found.\n")
        return
    _print_retained_rows(rows, out)


def _print_message(data: dict[str, Any], out: TextIO) -> None:
    out.write(str(data["message"]) + "\n")


# --- commands ------------------------------------------------------------------------------------------


class Command:
    def __init__(self, args: argparse.Namespace, api: Api, out: TextIO, err: TextIO, stdin: TextIO) -> None:
        self.args, self.api, self.out, self.err, self.stdin = args, api, out, err, stdin
        self.output: str | None = args.output

    @property
    def namespace(self) -> str:
        return str(self.args.namespace or self.api.default_namespace)

    @property
    def list_namespace(self) -> str | None:
        return None if self.args.all_namespaces else self.namespace

    def status(self) -> int:
        name = self.args.name
        instance = self.api.instance(self.namespace, name)
        retained = self.api.retained_volumes(self.namespace, name)
        events = self.api.events(self.namespace)
        card = views.status_card(instance, retained, events, _now())
        _emit(card, self.output, _print_card, self.out)
        return EXIT_OK

    def list(self) -> int:
        now = _now()
        instances = self.api.instances(self.list_namespace)
        retained = self.api.retained_volumes(self.list_namespace)
        rows = [views.instance_row(i, retained, now) for i in instances]
        rows.sort(key=lambda r: (not r["attention"], r["namespace"] or "", r["name"] or ""))
        _emit(rows, self.output, _print_list, self.out)
        return EXIT_OK

    def recoveries(self) -> int:
        instances = self.api.instances(self.list_namespace)
        events = self.api.events(self.list_namespace)
        _emit(views.recoveries(instances, events, _now()), self.output, _print_recoveries, self.out)
        return EXIT_OK

    def retained(self) -> int:
        now = _now()
        rows = [views.retained_row(r, now) for r in self.api.retained_volumes(self.list_namespace)]
        rows.sort(key=lambda r: (r["phase"] != "Blocked", r["retainUntil"] or ""))
        _emit(rows, self.output, _print_retained, self.out)
        return EXIT_OK

    def retry(self) -> int:
        name = self.args.name
        instance = self.api.instance(self.namespace, name)
        token = _now().strftime("%Y%m%dT%H%M%S.%fZ")
        self.api.merge_patch(
            INSTANCE_PLURAL, self.namespace, name, {"metadata": {"annotations": {RETRY_ANNOTATION: token}}}
        )
        stalled = views.condition(instance, "Stalled")
        message = f"retry requested for {self.namespace}/{name} ({RETRY_ANNOTATION}={token})"
        if stalled.get("reason") != Reason.RECOVERY_FAILED or stalled.get("status") != "True":
            message += (
                "; note: the last recovery did not fail, so the operator has nothing to retry until one does"
            )
        result = {"namespace": self.namespace, "name": name, "annotation": RETRY_ANNOTATION, "value": token}
        _emit({**result, "message": message}, self.output, _print_message, self.out)
        return EXIT_OK

    def brake(self) -> int:
        lease = self.api.brake_lease(self.args.operator_namespace)
        annotations = (lease.get("metadata") or {}).get("annotations") or {}
        state = annotations.get(BRAKE_STATE, "Armed")
        result = {
            "state": state,
            "reason": annotations.get(BRAKE_REASON, ""),
            "changedAt": annotations.get(BRAKE_CHANGED_AT, ""),
            "message": f"brake {state}"
            + (f": {annotations[BRAKE_REASON]}" if annotations.get(BRAKE_REASON) else ""),
        }
        _emit(result, self.output, _print_message, self.out)
        return EXIT_OK

    def rearm(self) -> int:
        namespace = self.args.operator_namespace
        changed_at = _now().isoformat().replace("+00:00", "Z")
        self.api.patch_brake_lease(
            namespace, {BRAKE_STATE: BRAKE_RELEASED, BRAKE_REASON: "", BRAKE_CHANGED_AT: changed_at}
        )
        message = (
            "brake released: paused recoveries proceed (through the recovery budget); it arms itself again "
            "once a whole window passes without a confirmed stop"
        )
        _emit({"state": BRAKE_RELEASED, "message": message}, self.output, _print_message, self.out)
        return EXIT_OK

    def retained_delete(self) -> int:
        name = self.args.name
        body = self.api.retained_volume(self.namespace, name)
        row = views.retained_row(body, _now())
        if not self.args.yes:
            self.err.write(
                f"Delete Fly volume {row['volumeId']} ({row['region']}, app "
                f"{(body.get('spec') or {}).get('flyApp')}) kept for instance {row['instance']} until "
                f"{row['retainUntil']}? This cannot be undone. [y/N] "
            )
            self.err.flush()
            answer = self.stdin.readline().strip().lower()
            if answer not in ("y", "yes"):
                self.err.write("not deleted\n")
                return EXIT_ABORTED
        self.api.merge_patch(RETAINED_PLURAL, self.namespace, name, {"spec": {"deleteNow": True}})
        message = (
            f"retained volume {self.namespace}/{name} ({row['volumeId']}) marked for deletion; the operator "
            f"deletes it through the ownership-checked delete (follow with: kubectl kiloclaw retained -n "
            f"{self.namespace})"
        )
        _emit(
            {"namespace": self.namespace, "name": name, "message": message},
            self.output,
            _print_message,
            self.out,
        )
        return EXIT_OK

    def report(self) -> int:
        name = self.args.name
        instance = self.api.instance(self.namespace, name)
        retained = self.api.retained_volumes(self.namespace, name)
        events = self.api.events(self.namespace)
        names = {name} | {str((r.get("metadata") or {}).get("name")) for r in retained}
        metrics_source = self.args.metrics_url or DEFAULT_METRICS_PATH
        try:
            metrics: dict[str, Any] = {
                "source": metrics_source,
                "text": _kiloclaw_metrics(self.api.get_text(metrics_source)),
            }
        except PluginError as exc:
            metrics = {"source": metrics_source, "error": str(exc)}
        bundle = {
            "kind": "KiloClawReport",
            "generatedAt": _now().isoformat().replace("+00:00", "Z"),
            "plugin": __version__,
            "context": self.api.context,
            "server": self.api.version(),
            "card": views.status_card(views.redact_object(instance), retained, events, _now()),
            "instance": views.redact_object(instance),
            "retainedVolumes": [views.redact_object(r) for r in retained],
            "events": views.events_about(events, self.namespace, names),
            "operatorMetrics": metrics,
        }
        text = yaml.safe_dump(json.loads(json.dumps(bundle, default=str)), sort_keys=False)
        if self.output == "json":
            text = json.dumps(bundle, indent=2, default=str) + "\n"
        if self.args.file:
            with open(self.args.file, "w", encoding="utf-8") as handle:
                handle.write(text)
            self.err.write(f"report written to {self.args.file} (env values and spec copies redacted)\n")
        else:
            self.out.write(text)
        return EXIT_OK


def _kiloclaw_metrics(text: str) -> str:
    """Only the operator's own series (and their HELP/TYPE lines): no process or Python runtime noise."""
    return "\n".join(line for line in text.splitlines() if "kiloclaw_" in line) + "\n"


# --- command line --------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--kubeconfig", default=default, help="path to the kubeconfig file")
    parser.add_argument("--context", default=default, help="the kubeconfig context to use")
    parser.add_argument("-n", "--namespace", default=default, help="namespace (default: the context's)")
    parser.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="every namespace (list, recoveries, retained)",
    )
    parser.add_argument(
        "-o", "--output", choices=("json", "yaml"), default=default, help="machine-readable output"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl kiloclaw",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kubectl-kiloclaw {__version__}")
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        child = sub.add_parser(name, help=help_text, description=help_text)
        _common(child, suppress=True)
        return child

    status = command("status", "the card of one instance")
    status.add_argument("name", metavar="NAME")
    status.set_defaults(run=Command.status)
    command("list", "all instances, one line each ('!' = needs attention)").set_defaults(run=Command.list)
    command("recoveries", "recent recovery attempts").set_defaults(run=Command.recoveries)
    retained = command("retained", "retained volumes with the time they have left")
    retained.set_defaults(run=Command.retained)
    retained_sub = retained.add_subparsers(dest="retained_command", metavar="delete")
    delete = retained_sub.add_parser("delete", help="delete a retained volume now (sets spec.deleteNow)")
    _common(delete, suppress=True)
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    delete.set_defaults(run=Command.retained_delete)
    retry = command("retry", f"a new recovery attempt after a failed one (sets {RETRY_ANNOTATION})")
    retry.add_argument("name", metavar="NAME")
    retry.set_defaults(run=Command.retry)
    for name, help_text, run in (
        ("brake", "the mass-failure brake: its state and why", Command.brake),
        ("rearm", "release an engaged brake: paused recoveries proceed", Command.rearm),
    ):
        brake = command(name, help_text)
        brake.add_argument(
            "--operator-namespace",
            default="kiloclaw-system",
            help="the operator's namespace, where its Lease kiloclaw-recovery-brake lives",
        )
        brake.set_defaults(run=run)
    report = command("report", "a redacted bundle for a bug report: specs, statuses, Events, metrics")
    report.add_argument("name", metavar="NAME")
    report.add_argument("-f", "--file", help="write the bundle to this file instead of stdout")
    report.add_argument(
        "--metrics-url",
        help="where to read the operator's metrics (default: the metrics Service through the API server)",
    )
    report.set_defaults(run=Command.report)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    stdin: TextIO | None = None,
) -> int:
    out, err, stdin = out or sys.stdout, err or sys.stderr, stdin or sys.stdin
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else EXIT_USAGE
    api: Api | None = None
    try:
        api = Api(args.kubeconfig, args.context)
        result: int = args.run(Command(args, api, out, err, stdin))
        return result
    except PluginError as exc:
        err.write(f"error: {exc}\n")
        return exc.code
    except KeyboardInterrupt:
        err.write("interrupted\n")
        return EXIT_ABORTED
    finally:
        if api is not None:
            api.close()


def entry_point() -> None:
    sys.exit(main())

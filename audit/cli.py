"""The `audit` command line (SPEC 6)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from eventsourcing.application import AggregateNotFoundError

from audit.config import (
    DATABASE_VARIABLE,
    SECRET_VARIABLE,
    ConfigError,
    Database,
    load_settings,
)
from audit.redaction import redact
from audit.runtime import collect_garbage_less_often, configure_logging
from audit.timeparse import TimeParseError, format_time, parse_time

if TYPE_CHECKING:  # imported where used: `audit show` need not load the runner
    from audit.projections.runner import Projector

EXIT_CONFIG = 2
EXIT_USAGE = 2  # as argparse's own usage errors
EXIT_NOT_FOUND = 1
EXIT_BUSY = 3  # another process holds what this command needs
EXIT_PROBLEMS = 1  # `audit verify` found the store not as it was recorded


def configured_database() -> Database:
    """The database, once every variable that is set has been checked, whichever command runs:
    a bad secret or body limit found by `audit project` or `audit projections` is one found
    before `audit serve` refuses to start (SPEC 1). Only `serve` requires a secret."""
    return load_settings(require_secret=False).database


def open_log(database, *, existing: bool = False):  # type: ignore[no-untyped-def]
    """Open the store, or stop with one line naming the variable when it cannot be reached.

    `existing`: a command that only reads or rebuilds refuses a store never opened before,
    rather than create an empty one that looks healthy (a typo in the URL)."""
    import sqlite3

    from audit.application import AuditLog
    from audit.storage import UNAVAILABLE_ERRORS, store_exists, unavailable_reason

    try:
        if existing and not store_exists(database):
            raise ConfigError(
                DATABASE_VARIABLE,
                f"no store at {database.url}: nothing was ever recorded there (a typo?)",
            )
        return AuditLog(database)
    # sqlite3.DatabaseError: a file that is not a database, which is no outage.
    except (*UNAVAILABLE_ERRORS, sqlite3.DatabaseError, OSError) as exc:
        raise ConfigError(
            DATABASE_VARIABLE,
            f"cannot use the database at {database.url}: {unavailable_reason(exc)}",
        ) from exc


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from audit.projections.runner import Projector
    from audit.serving import ProjectionProcess

    settings = load_settings()
    log = open_log(settings.database)
    # uvicorn raises the signal that stopped it again once it has shut down. SIGTERM's default
    # action would then end this process before it could stop its projections' child.
    signal.signal(signal.SIGTERM, _exit_quietly)
    # Without: the projections run in `audit project` processes of their own (SPEC 7).
    projecting: contextlib.AbstractContextManager[object] = (
        contextlib.nullcontext() if args.no_projections else ProjectionProcess(settings.database)
    )
    with projecting:
        if args.workers > 1:
            log.close()
            uvicorn.run(
                "api.app:app_from_env",
                factory=True,
                host=args.host,
                port=args.port,
                workers=args.workers,
                log_level="info",
                access_log=False,  # api.access_log writes one without query strings
            )
        else:
            app = create_app(settings, log, projector=Projector(log), own_log=True)
            uvicorn.run(app, host=args.host, port=args.port, access_log=False)
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    import threading

    from audit.projections.runner import FOLLOWING_BATCH_SIZES, Projector

    log = open_log(configured_database())
    try:
        if args.once:
            try:
                _project_once(Projector(log, batch_size=FOLLOWING_BATCH_SIZES[log.db.dialect]))
            except KeyboardInterrupt:  # each step commits whole, or not at all
                print(
                    "audit project: interrupted; what was applied is kept, and the rest is"
                    " applied by the next run",
                    file=sys.stderr,
                )
                return EXIT_INTERRUPTED
            return 0
        projector = Projector(log, batch_size=FOLLOWING_BATCH_SIZES[log.db.dialect])
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        if args.exit_with_parent is not None:
            from audit.serving import stop_when_orphaned

            stop_when_orphaned(stop, args.exit_with_parent)
        projector.run_forever(stop)
        return 0
    finally:
        log.close()


def _project_once(projector: Projector) -> None:
    before = {row["name"]: row["position"] for row in projector.status()}
    projector.run_once()
    for row in projector.status():
        start = before.get(row["name"], 0)
        applied = projector.deliveries_between(start, row["position"])
        events = "event" if applied == 1 else "events"
        print(f"{row['name']}: applied {applied} {events}, at position {row['position']}")


def cmd_projections(args: argparse.Namespace) -> int:
    from audit.projections.runner import Projector

    log = open_log(configured_database(), existing=True)
    try:
        projector = Projector(log, register=False)  # a status command writes nothing
        rows = projector.status()
    finally:
        log.close()
    if not rows:
        print("no projection has run on this store yet")
        return 0
    columns = ("name", "version", "position", "lag", "state", "errors")
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        name, serving = row["name"], row["serving_version"]
        if row["state"] == "rebuilding":
            print(
                f"{name}: reads use v{serving} until the build switches,"
                f" {row['serving_lag']} deliveries behind the store"
            )
        known = projector.projections[name].version
        if row["state"] == "rebuilding" and row["version"] > known:
            print(
                f"{name}: the build under way is v{row['version']}, which this release cannot step"
            )
        if serving > known:
            print(f"{name}: reads use v{serving}, which this release (v{known}) cannot step")
        elif serving < known and row["version"] != known:
            print(
                f"{name}: reads use v{serving}; this release's `audit serve` or"
                f" `audit project` will build v{known}"
            )
    return 0


LEFT_PART_WAY = (
    "A build not yet switched is carried on by a running `audit serve` or `audit project`;"
    " `audit rebuild` again starts a fresh one"
)
EXIT_INTERRUPTED = 128 + signal.SIGINT


def cmd_rebuild(args: argparse.Namespace) -> int:
    from audit.projections.runner import all_projections
    from audit.storage import LockHeld, held_exclusively, unavailable_reason

    known = [projection.name for projection in all_projections()]
    if not args.all and args.name not in known:
        # A usage error, as argparse's own: exit 2, before touching the store.
        print(
            f"audit rebuild: no such projection {args.name!r} (known: {', '.join(known)})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    log = open_log(configured_database(), existing=True)
    try:
        # Two at once would each drop the other's build, and one would say it had switched.
        with held_exclusively(log.database, "rebuild"):
            return _rebuild(log, args)
    except LockHeld:
        print(
            "audit rebuild: another `audit rebuild` is running on this store;"
            " try again when it has finished",
            file=sys.stderr,
        )
        return EXIT_BUSY
    except KeyboardInterrupt:
        print(f"audit rebuild: interrupted. {LEFT_PART_WAY}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        reason = unavailable_reason(exc)
        if reason is None:
            raise
        print(
            f"audit rebuild: the database could not be used: {reason}. {LEFT_PART_WAY}",
            file=sys.stderr,
        )
        return 1
    finally:
        log.close()


def _rebuild(log, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from audit.projections import parallel
    from audit.projections.runner import NewerVersion, Projector, failure_text
    from audit.storage import is_store_down

    projector = Projector(log)
    names = list(projector.projections) if args.all else [args.name]
    try:
        if not args.downgrade:
            for name in names:  # all checked before any build starts
                projector.check_rebuild(name)
        generations = {name: projector.rebuild(name, downgrade=args.downgrade) for name in names}
    except NewerVersion as exc:
        target = "--all" if args.all else exc.name
        print(
            f"audit rebuild: {exc.name} is at v{exc.store_version} (live or being built), newer"
            f" than this release's v{exc.release_version}. Rebuilding would leave the releases"
            f" that know v{exc.store_version} unable to step it. Run the newer release's"
            " `audit rebuild`, or, to roll back on purpose once every newer release is"
            f" stopped, `audit rebuild {target} --downgrade`",
            file=sys.stderr,
        )
        return 1
    desc = ", ".join(f"{name} g{generation}" for name, generation in generations.items())
    chosen = [projector.projections[name] for name in names]
    groups = parallel.rebuild_groups(log.database, chosen)
    if len(groups) > 1:
        print(f"in {len(groups)} processes: {' | '.join(', '.join(g) for g in groups)}")
    # The log's lines (a switch, a poison event) are written above the bar, not through it.
    with logging_redirect_tqdm(), tqdm(desc=desc, unit=" records") as bar:
        progress = RebuildProgress(bar, projector.db.stored_records, builds=len(names))
        failed: str | None = None  # why, when one failed; the others went on, and may switch
        if len(groups) > 1:
            try:
                parallel.catch_up_in_processes(log.database, groups, progress)
            except parallel.CatchUpFailed as exc:
                failed = str(exc)
        else:  # the builds step in turn, sharing each batch's decoding
            try:
                projector.catch_up(
                    *(projector.projections[name] for name in names), progress=progress
                )
            except Exception as exc:
                if is_store_down(exc):
                    raise  # nothing more can be said of the builds: cmd_rebuild's one line
                failed = failure_text(exc)
        if failed is not None:
            bar.close()
            print(f"rebuild failed:\n{failed}", file=sys.stderr)
            _report_switches(log, generations)
            return 1
        progress.finish()
    return 0 if _report_switches(log, generations) else 1


def _report_switches(log, generations: dict[str, int]) -> bool:  # type: ignore[no-untyped-def]
    """Say where each projection's reads are; whether all are on the generation built here
    (a build that another one replaced said it had switched)."""
    from audit.projections.runner import active_tables

    switched = True
    for name, generation in generations.items():
        serving = active_tables(log.db, name).generation
        if serving == generation:
            print(f"{name}: reads switched to generation {generation}")
        else:
            switched = False
            print(f"{name}: not switched; reads use generation {serving}", file=sys.stderr)
    return switched


class RebuildProgress:
    """A rebuild's bar: stored records read (deliveries and their markers), for each build.

    Deliveries that arrive during the rebuild are read by it too, so when the count would pass
    the total, the store is counted again (the bar went past 100% before)."""

    def __init__(self, bar: Any, stored_records: Callable[[], int], *, builds: int) -> None:
        self.bar, self.stored_records, self.builds = bar, stored_records, builds
        bar.reset(total=stored_records() * builds)

    def __call__(self, _name: str, records: int) -> None:
        if self.bar.n + records > self.bar.total:
            self.bar.total = max(self.stored_records() * self.builds, self.bar.n + records)
        self.bar.update(records)

    def finish(self) -> None:
        """The builds have caught up. A running `audit serve` or `audit project` steps the same
        builds, so this process may have read only part of the store itself (the bar stopped
        at 33-86% and then said the builds had switched)."""
        if self.bar.n < self.bar.total:
            self.bar.update(self.bar.total - self.bar.n)


def cmd_send_samples(args: argparse.Namespace) -> int:
    import httpx

    from audit.samples import describe, send_samples

    secrets = load_settings().signing_secrets  # every variable checked, as by every command
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    try:
        counts = send_samples(args.url, secrets[0])
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        print(f"audit send-samples: {args.url}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    print(describe(counts))
    return 1 if counts["failed"] else 0


def _bounded(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high` (a bad one is argparse's one line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not from {low} to {high}")
        return value

    return parse


def cmd_show(args: argparse.Namespace) -> int:
    as_of = None
    if args.as_of is not None:  # an empty one too: refused, as the API refuses `as_of=`
        try:
            as_of = parse_time(args.as_of)
        except TimeParseError as exc:
            print(f"--as-of: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    family = "organization" if args.id.startswith("org_") else "user"
    if not args.id.startswith(("org_", "user_")):
        print(
            f"audit show: {args.id!r} is neither a user (user_...) nor an organization (org_...);"
            f" the events about any id: /v1/events?subject={args.id}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    log = open_log(configured_database(), existing=True)
    try:
        if family == "organization":
            state = log.organization_state(args.id, as_of=as_of)
        else:
            state = log.user_state(args.id, as_of=as_of)
    except AggregateNotFoundError:
        print(f"{args.id}: {_nothing_recorded(log, family, args.id)}", file=sys.stderr)
        return EXIT_NOT_FOUND
    finally:
        log.close()
    view = state.view()
    # The aggregate, not only the object: a user known so far by a session alone is shown,
    # as without --as-of (the API's /v1/users/{id} is about the user's own record: 404).
    if as_of is not None and view["first_seen_at"] is None:
        print(f"{args.id}: nothing recorded about it as of {format_time(as_of)}", file=sys.stderr)
        return EXIT_NOT_FOUND
    # The store keeps every secret; what is printed is pasted into tickets and chats.
    print(json.dumps(redact(view), indent=2, sort_keys=True))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from audit.integrity import Seal, verify_store
    from audit.storage import unavailable_reason

    try:
        seals = [Seal.parse(text) for text in args.sealed]
    except ValueError as exc:
        print(f"audit verify: --sealed: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    settings = load_settings(require_secret=False)
    log = open_log(settings.database, existing=True)
    try:
        # On a terminal only: a log collector gets the result lines, not a bar's redraws.
        with tqdm(total=log.db.stored_records(), unit=" events", disable=None) as bar:

            def progress(events: int) -> None:
                bar.total = max(bar.total, bar.n + events)  # appends go on meanwhile
                bar.update(events)

            report = verify_store(
                log, secrets=settings.signing_secrets, seals=seals, progress=progress
            )
    except KeyboardInterrupt:
        print("audit verify: interrupted; nothing was checked to the end", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        reason = unavailable_reason(exc)
        if reason is None:
            raise
        # Not 1, which says the store was checked and found changed.
        print(f"audit verify: the database could not be used: {reason}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        log.close()
    print(
        f"read {report.events} stored events: {report.deliveries} deliveries,"
        f" {report.markers} markers, in {report.streams} streams"
    )
    if report.signatures_checked:
        print(
            f"signatures: {report.signed} made by a configured signing secret;"
            f" {report.unsigned} without one, recorded before signatures were kept"
        )
    else:
        print(f"signatures not checked: {SECRET_VARIABLE} is not set")
    for held in report.seals_held:
        print(f"seal {held.position} holds: the stored events up to it are those it sealed")
    for broken in report.seals_broken:  # each given seal is answered, however many problems
        print(broken)
    if report.ok:
        print(
            "ok: every delivery is what its body says and has its marker, and no stream has a gap"
        )
    else:
        for problem in report.problems:
            print(problem)
        unlisted = report.problem_count - len(report.problems)
        if unlisted:
            print(f"... and {unlisted} more")
        count = report.problem_count + len(report.seals_broken)
        what = "the store is not as it was recorded"
        if not report.problem_count:  # a seal alone: it may be another store's, or mistyped
            what = "the store is not as it was sealed, or a seal given is not this store's"
        print(f"{count} problem{'' if count == 1 else 's'}: {what}")
    # Last, to be copied: the store as this walk read it, whatever it found.
    print(f"seal: {report.seal}")
    return 0 if report.ok else EXIT_PROBLEMS


def _nothing_recorded(log, family: str, clerk_id: str) -> str:  # type: ignore[no-untyped-def]
    """Why `show` has no aggregate to show: nothing at all, or no event of the object's own
    (a user named by a membership only), as the API's 404 says it."""
    from audit import queries
    from audit.projections.runner import UnknownProjection, reads_behind

    try:
        known = queries.is_known_id(log.db, clerk_id)
        complete = known or reads_behind(log.db, "events") is None
    except (queries.ProjectionNotReady, UnknownProjection):
        known = complete = False
    if not known and complete:
        return "nothing recorded about it"
    # While the events index is behind the store, it cannot tell (`show` reads the store).
    concern = "other events concern it" if known else "other events may concern it"
    return (
        f"no {family}.* event is recorded for it, so its state is unknown; {concern}:"
        f" /v1/events?subject={clerk_id}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audit", description="clerk-audit: an audit log for Clerk"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP service with projections")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_bounded(0, 65535), default=8000)
    serve.add_argument("--workers", type=_bounded(1, 256), default=1)
    serve.add_argument(
        "--no-projections",
        action="store_true",
        help="serve only; the projections run in `audit project` processes elsewhere",
    )
    serve.set_defaults(func=cmd_serve)

    project = commands.add_parser("project", help="run the projections alone")
    project.add_argument("--once", action="store_true", help="catch up once, then exit")
    # How `audit serve` starts its projections' child: not for users.
    project.add_argument("--exit-with-parent", type=int, metavar="PID", help=argparse.SUPPRESS)
    project.set_defaults(func=cmd_project)

    projections = commands.add_parser("projections", help="status of every projection")
    projections.set_defaults(func=cmd_projections)

    rebuild = commands.add_parser("rebuild", help="rebuild a projection beside the live one")
    target = rebuild.add_mutually_exclusive_group(required=True)
    target.add_argument("name", nargs="?", help="the projection to rebuild")
    target.add_argument("--all", action="store_true", help="rebuild every projection")
    rebuild.add_argument(
        "--downgrade",
        action="store_true",
        help="build this release's version even if the store's is newer (a deliberate roll-back)",
    )
    rebuild.set_defaults(func=cmd_rebuild)

    samples = commands.add_parser("send-samples", help="sign and POST the bundled sample payloads")
    samples.add_argument("--url", default="http://127.0.0.1:8000/webhooks/clerk")
    samples.set_defaults(func=cmd_send_samples)

    show = commands.add_parser("show", help="print an aggregate rebuilt from the stream")
    show.add_argument("id", help="user_... or org_...")
    show.add_argument("--as-of", help="ISO 8601 time or epoch milliseconds")
    show.set_defaults(func=cmd_show)

    verify = commands.add_parser(
        "verify",
        help="check that every stored delivery is what its body says and was signed",
        description="Check the event store against itself; print its seal (POSITION:SHA256)"
        " last. Keep the seal where the store's owner cannot write: a later `audit verify"
        " --sealed` with it shows whether any stored event up to that position has been"
        " changed, removed or added since.",
    )
    verify.add_argument(
        "--sealed",
        action="append",
        default=[],
        metavar="POSITION:SHA256",
        help="a seal an earlier `audit verify` printed: check that the store still matches it"
        " (repeatable)",
    )
    verify.set_defaults(func=cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    collect_garbage_less_often()  # spawned workers set it themselves (api.app, parallel)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:
        # The reader went away (`audit show ... | head`): what it took was all it wanted.
        # Python would report the pipe again while flushing stdout at exit: point it nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""``fedfleet``: run (coordinator + workers on this machine), coordinator, worker, report, serve, certs, data.

Run options come from ``config.OPTIONS`` (one table, one validation, one error format); values are
taken from defaults, then ``--config FILE``, then flags. A bad value ends the command with a one-line
error naming the option and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fedfleet import log
from fedfleet.asgi import JSON_BODY_LIMIT
from fedfleet.config import OPTIONS, RunConfig, load_toml
from fedfleet.coordinator.limits import HEADER_LIMIT, HEADER_TIMEOUT, IDLE_TIMEOUT
from fedfleet.errors import ConfigError, FedfleetError
from fedfleet.options import Option
from fedfleet.protocol.client import check_url
from fedfleet.tasks import (
    BUILTIN,
    TRAINING,
    check_run,
    declared_options,
    find_task,
    load_task,
    task_arguments,
    training_defaults,
)

ERROR = "fedfleet: error: "


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run options (also settable in --config FILE)")
    g.add_argument("--config", metavar="FILE", type=Path, help="TOML file with run options; flags win [default none]")
    for opt in OPTIONS:
        default = opt.default_text or opt.default
        if opt.name in TRAINING:
            default = f"{default}, or the task's own (below)"
        # An on/off option is a switch: the flag alone turns it on.
        switch = {"nargs": "?", "const": "on"} if opt.choices == ("off", "on") else {}
        g.add_argument(opt.flag, dest=opt.name, default=None, metavar=opt.name.upper(),
                       help=f"{opt.help} [{opt.allowed()}; default {default}]", **switch)  # type: ignore[arg-type]
    g.add_argument("--task-option", dest="task_options", action="append", default=None, metavar="KEY=VALUE",
                   help="option passed to the task, e.g. data_dir=/path (repeatable); the built-in tasks' "
                        "are listed below [default: the task's defaults]")
    g.add_argument("--strategy-option", dest="strategy_options", action="append", default=None,
                   metavar="KEY=VALUE",
                   help="option of the strategy, e.g. server_lr=0.5 (repeatable) [default: the strategy's defaults]")


def run_config(args: argparse.Namespace) -> RunConfig:
    values: dict[str, Any] = load_toml(args.config) if args.config else {}
    for opt in OPTIONS:
        if getattr(args, opt.name) is not None:
            values[opt.name] = getattr(args, opt.name)
    for field, flag in (("task_options", "task-option"), ("strategy_options", "strategy-option")):
        given = getattr(args, field)
        if given:
            merged = dict(values.get(field, {}))
            for entry in given:
                key, sep, value = entry.partition("=")
                if not sep or not key:
                    raise ConfigError(f"The '{flag}' option must look like KEY=VALUE. Got {entry!r} instead.",
                                      option=field)
                merged[key] = value
            values[field] = merged
    config = RunConfig.from_mapping(values)
    # The task is checked here, before anything is started or written: a bad name or task option is one
    # line now, not a coordinator that fails seconds later.
    task = find_task(config.task)
    task_arguments(task, config.task, config.task_options_dict)
    # The task's recommended training settings, for those the user did not set (by flag or file). The
    # config records the values used, so the same command later resumes the same run.
    defaults = training_defaults(task, config.task)
    config = RunConfig.from_mapping({**defaults, **values}) if defaults else config
    # A task may refuse the run's settings (model=gbdt: the strategy, --dp, the number of rounds). Only a task
    # class with check_run is built here: building others may need what only a worker has (torch, data).
    if callable(getattr(task, "check_run", None)):
        check_run(load_task(config.task, config.task_options_dict), config)
    if config.dp != "none":
        # Also before anything starts: the accountant library is there, the task can be trained privately,
        # sigma can be solved for --dp-target-epsilon and one round fits in --dp-max-epsilon.
        from fedfleet.coordinator.privacy import plan_privacy

        plan_privacy(config, load_task(config.task, config.task_options_dict))
    return config


def _tasks_help() -> str:
    """The built-in tasks with their options and recommended training settings, for ``--help``."""
    lines = ["built-in tasks (--task NAME), the training settings they use unless given, and their options",
             "(--task-option KEY=VALUE):"]
    first: dict[tuple[Option, ...], str] = {}  # a subclass's options, shown once under the first task
    for name in BUILTIN:
        task = find_task(name)
        declared = declared_options(task, name) or ()
        training = "".join(f" --{k.replace('_', '-')} {v}" for k, v in training_defaults(task, name).items())
        same = first.setdefault(declared, name)
        lines.append(f"  {name}{training}" + (f"  (options as {same})" if same != name else ""))
        for opt in declared if same == name else ():
            default = opt.default_text or opt.default
            lines.append(textwrap.fill(f"{opt.name}: {opt.help} [{opt.allowed()}; default {default}]", width=100,
                                       initial_indent=" " * 6, subsequent_indent=" " * 8))
    lines.append("  module.path:Class  a task of your own (README: Your own task)")
    return "\n".join(lines)


TASKS_EPILOG = "(the built-in tasks)"  # replaced by _tasks_help() when, and only when, help is printed


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose tasks epilog is built when help is printed: building it imports every built-in
    task (pyarrow among them, ~40 MiB), which a coordinator or worker process must not pay for at start."""

    def format_help(self) -> str:
        if self.epilog == TASKS_EPILOG:
            self.epilog = _tasks_help()
        return super().format_help()


def _default_out(config: RunConfig) -> Path:
    """runs/TASK-PARTITION, without the colons of module:Class and dirichlet:ALPHA (not allowed in folder
    names on Windows, and taken as a host by scp and rsync)."""
    return Path("runs") / f"{config.task.replace(':', '.')}-{config.partition.replace(':', '')}"


def _given_options(args: argparse.Namespace) -> set[str]:
    """The run options this command line sets, by flag or in --config (not the defaults): with
    ``run --resume`` they must agree with the run's saved config."""
    given = set(load_toml(args.config)) if args.config else set()
    given |= {opt.name for opt in OPTIONS if getattr(args, opt.name) is not None}
    return given | {name for name in ("task_options", "strategy_options") if getattr(args, name)}


def _fail(parser: argparse.ArgumentParser, status: int, exc: Exception) -> NoReturn:
    # A child's error quoted in this one (the runner quotes the coordinator's last lines) has the prefix already.
    text = "\n".join(line.removeprefix(ERROR) for line in str(exc).splitlines())
    parser.exit(status, f"{ERROR}{text}\n")


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be an int in the range [0, 65535]. Got {text!r} instead")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an int of at least 1. Got {text!r} instead")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0. Got {text!r} instead")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0. Got {text!r} instead")
    return value


def _url(text: str) -> str:
    try:
        return check_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _download(args: argparse.Namespace) -> int:
    from fedfleet.tasks.download import SOURCES, Fetched, download
    from fedfleet.tasks.mnist import data_dir

    source = SOURCES[args.dataset]
    folder = args.to or data_dir(source)

    def show(f: Fetched) -> None:
        print(f"{f.path}  {'kept: verified' if f.url is None else 'downloaded from ' + f.url}", flush=True)

    download(source, folder, args.mirrors or (), args.timeout, on_file=show)
    print(f"{source.name}: all files verified in {folder}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from fedfleet.coordinator.security import parse_allowed_hosts, read_token
    from fedfleet.web.serve import serve

    if (args.path is None) == (args.run is None):
        raise ConfigError("fedfleet serve takes one folder: PATH (a run, or a folder of runs) or --run RUN_DIR"
                          + ("" if args.path is None else f", not both ({args.path} and --run {args.run})"),
                          option="path")
    return serve(args.path or args.run, args.host, args.port, tuple(args.allowed_tasks), only_run=args.run is not None,
                 admin_token=read_token(args.admin_token_file, "FEDFLEET_ADMIN_TOKEN", "admin token"),
                 tls_cert=args.tls_cert, tls_key=args.tls_key, insecure=args.insecure,
                 allowed_hosts=parse_allowed_hosts(args.allowed_hosts))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedfleet")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"



def _add_served_security(group: argparse._ArgumentGroup, *, admin: str, unguarded: str) -> None:
    """The options every fedfleet server shares: admin token, TLS, who may bind beyond loopback, host names.
    ``admin``: what the admin token guards and its default; ``unguarded``: the token a non-loopback host needs."""
    group.add_argument("--admin-token-file", type=Path, default=None, metavar="FILE",
                       help=f"file holding the admin token (or env FEDFLEET_ADMIN_TOKEN): needed for {admin}")
    group.add_argument("--tls-cert", type=Path, default=None, metavar="FILE",
                       help="PEM certificate: serve https (fedfleet certs makes one) [default none: http]")
    group.add_argument("--tls-key", type=Path, default=None, metavar="FILE",
                       help="PEM private key of --tls-cert [default none]")
    group.add_argument("--insecure", action="store_true",
                       help=f"allow a non-loopback --host without {unguarded} (trusted networks only)")
    group.add_argument("--allowed-hosts", default="", metavar="NAMES",
                       help="comma-separated host names (*.NAME for all under NAME) requests may be addressed to, "
                            "besides localhost and the --host address; without an admin token on loopback other "
                            "names get 421 (against DNS rebinding) [default none]")

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedfleet", description="Federated learning: a coordinator and workers "
                                     "that train one model without moving their data.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--log-level", default=os.environ.get("FEDFLEET_LOG_LEVEL"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level (default INFO for coordinator and worker, WARNING for run)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="a whole federated run on this machine: coordinator + worker processes",
                         epilog=TASKS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_options(run)
    run.add_argument("--out", type=Path, default=None, help="output folder (default runs/TASK-PARTITION)")
    run.add_argument("--processes", type=_positive_int, default=None,
                     help="worker processes to spread --workers over, each hosting its share as threads "
                          "(default: one per CPU this run may use, by CPU affinity and cgroup quota, at most "
                          "--workers)")
    run.add_argument("--overwrite", action="store_true",
                     help="delete the run already in --out and start over [default: refuse an existing run]")
    run.add_argument("--resume", action="store_true",
                     help="carry on the run in --out (stopped or crashed) from its last completed round, with the "
                          "config saved there; run options given too must agree with it [default: off]")
    run.add_argument("--quiet", action="store_true", help="no progress bar or table")
    run.add_argument("--data-split", type=Path, default=None, metavar="FILE",
                     help="split FILE into one file per worker (by --partition: iid, dirichlet:ALPHA or "
                          "natural:COLUMN) in OUT/sites, and start each worker on its own file with --data, as "
                          "sites of a real deployment would run [default none: partitions of the task's data set]")

    sim = sub.add_parser("simulate", help="a study with many clients: the same run, its clients trained by a pool "
                         "of executors with no sockets", epilog=TASKS_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_options(sim)
    sim.add_argument("--out", type=Path, default=None, help="output folder (default runs/TASK-PARTITION)")
    sim.add_argument("--backend", choices=["local", "ray"], default="local",
                     help="who trains the sampled clients: processes on this host, or Ray actors (pip install "
                          "'fedfleet[ray]') [default local]")
    sim.add_argument("--executors", type=_positive_int, default=None,
                     help="processes or Ray actors training clients, one client at a time each (default: one per "
                          "CPU this run may use, at most the clients a round samples)")
    sim.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="with --backend ray, the cluster to join (e.g. ray://head:10001 or auto) [default: start a "
                          "local Ray instance]")
    sim.add_argument("--overwrite", action="store_true",
                     help="delete the run already in --out and start over [default: refuse an existing run]")
    sim.add_argument("--resume", action="store_true",
                     help="carry on the run in --out from its last completed round, with the config saved there")
    sim.add_argument("--quiet", action="store_true", help="no progress bar or table")

    coord = sub.add_parser("coordinator", help="serve a run for workers on other hosts", epilog=TASKS_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_options(coord)
    coord.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0 for all) [default 127.0.0.1]")
    coord.add_argument("--port", type=_port, default=8080, help="port (0 picks a free one) [default 8080]")
    coord.add_argument("--data-dir", type=Path, default=Path("runs/coordinator"),
                       help="state, checkpoints and outputs; restart with the same one to resume "
                            "[default runs/coordinator]")
    coord.add_argument("--linger", type=_seconds, default=10.0,
                       help="seconds to keep serving after the run so workers hear it is over; a coordinator scraped "
                            "twice or more also waits (at most two scrape intervals) for a scrape to see the end "
                            "[default 10]")
    sec = coord.add_argument_group("security and limits (see docs/reliability.md)")
    _add_served_security(sec, admin="status, metrics, dashboard and control endpoints [default none: "
                                    "$FEDFLEET_ADMIN_TOKEN if set, else these are open]", unguarded="a join token")
    sec.add_argument("--join-token-file", type=Path, default=None, metavar="FILE",
                     help="file holding the join token (or env FEDFLEET_JOIN_TOKEN): needed to register; each "
                          "worker then gets its own token [default none: $FEDFLEET_JOIN_TOKEN if set, else anyone "
                          "may join]")
    sec.add_argument("--max-body-bytes", type=_positive_int, default=JSON_BODY_LIMIT, metavar="N",
                     help=f"largest JSON request body (updates are bounded by the model's size) "
                          f"[default {JSON_BODY_LIMIT}]")
    sec.add_argument("--registration-rate", type=_positive_float, default=20.0, metavar="PER_SECOND",
                     help="registrations accepted per second on average; more get 429 [default 20]")
    sec.add_argument("--registration-burst", type=_positive_int, default=200, metavar="N",
                     help="registrations accepted at once, e.g. a fleet starting together [default 200]")
    sec.add_argument("--max-connections", type=_positive_int, default=None, metavar="N",
                     help="open connections served at once; more get 503 (each worker holds up to 3) "
                          "[default unlimited]")
    sec.add_argument("--max-header-bytes", type=_positive_int, default=HEADER_LIMIT, metavar="N",
                     help=f"largest request line + headers of a request; more get 431 [default {HEADER_LIMIT}]")
    sec.add_argument("--header-timeout", type=_positive_float, default=HEADER_TIMEOUT, metavar="SECONDS",
                     help="a connection that has not sent a request's headers this long after it opened (or "
                          "after the request's first byte) is closed; bodies are not timed "
                          f"[default {HEADER_TIMEOUT:g}]")
    sec.add_argument("--idle-timeout", type=_positive_float, default=IDLE_TIMEOUT, metavar="SECONDS",
                     help="a kept-alive connection with no new request this long is closed "
                          f"[default {IDLE_TIMEOUT:g}]")

    worker = sub.add_parser("worker", help="join a coordinator and train on a local partition")
    worker.add_argument("--coordinator", type=_url, required=True, help="coordinator URL, http://HOST:PORT")
    worker.add_argument("--data", dest="data", action="append", type=Path, default=[], metavar="PATH",
                        help="this site's own data, a file or folder (repeatable): train and validate on it "
                             "instead of a partition the coordinator assigns; the data never leaves this host "
                             "[default none: a partition of the task's shared data set]")
    worker.add_argument("--clients", type=_positive_int, default=1,
                        help="logical workers in this process, each with its own id and partition [default 1]")
    worker.add_argument("--state-dir", type=Path, default=Path(".fedfleet-worker"), metavar="DIR",
                        help="where worker ids are kept, so a restarted worker keeps its partition; a process "
                             "locks it, and one started while it is locked takes DIR/1, DIR/2, ... "
                             "[default .fedfleet-worker]")
    worker.add_argument("--name", default="",
                        help="name shown by the coordinator, /K added for each of --clients [default HOST-PID]")
    worker.add_argument("--give-up", type=_seconds, default=300.0,
                        help="seconds without an answer from the coordinator before a worker gives up [default 300]")
    worker.add_argument("--metrics-port", type=_port, default=0,
                        help="serve Prometheus metrics of this process on this port (default 0: off)")
    worker.add_argument("--metrics-host", default="127.0.0.1",
                        help="address the metrics are served on (0.0.0.0 for a Prometheus on another host) "
                             "[default 127.0.0.1]")
    worker.add_argument("--join-token-file", type=Path, default=None, metavar="FILE",
                        help="file holding the coordinator's join token (or env FEDFLEET_JOIN_TOKEN) "
                             "[default none: $FEDFLEET_JOIN_TOKEN if set, else join an open coordinator]")
    worker.add_argument("--allow-task", dest="allowed_tasks", action="append", default=[], metavar="MODULE:CLASS",
                        help="a task of your own this worker may run when the coordinator asks (repeatable); "
                             "built-in tasks are always allowed, nothing else is [default none]")
    worker.add_argument("--ca", type=Path, default=None, metavar="FILE",
                        help="PEM certificate(s) of the CA to trust for an https coordinator (default: the system's)")

    certs = sub.add_parser("certs", help="make a development CA and a server certificate for --tls-cert/--tls-key")
    certs.add_argument("--out", type=Path, default=Path("certs"), help="folder for the PEM files [default certs]")
    certs.add_argument("--host", dest="hosts", action="append", default=None, metavar="NAME",
                       help="host name or IP address the coordinator is reached at (repeatable) "
                            "[default localhost and 127.0.0.1]")
    certs.add_argument("--days", type=_positive_int, default=365, help="days the certificates are valid [default 365]")
    certs.add_argument("--force", action="store_true", help="replace certificates already in --out")

    report = sub.add_parser("report", help="PNG plots and report.md of a run, or of several side by side")
    report.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="a run's folder (fedfleet run --out, fedfleet coordinator --data-dir)")
    report.add_argument("--out", type=Path, default=None,
                        help="output folder (default RUN_DIR/report for one run, ./report for several)")

    serve = sub.add_parser("serve", help="the dashboards and predict pages of finished runs, from their files: one "
                                         "run, or a list of every run under a folder with a compare view")
    serve.add_argument("path", nargs="?", type=Path, default=None, metavar="PATH",
                       help="a run's folder (fedfleet run --out, fedfleet coordinator --data-dir), or a folder whose "
                            "subfolders (to 3 levels) are runs: a run list at /, each run under /runs/NAME/, "
                            "compare at /compare")
    serve.add_argument("--run", type=Path, default=None, metavar="RUN_DIR",
                       help="a run's folder, as PATH but only a run [default: PATH]")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0 for all) [default 127.0.0.1]")
    serve.add_argument("--port", type=_port, default=8080, help="port (0 picks a free one) [default 8080]")
    serve.add_argument("--allow-task", dest="allowed_tasks", action="append", default=[], metavar="MODULE:CLASS",
                       help="a task of your own to load for the predict page if the run names it (repeatable); "
                            "built-in tasks are always allowed, nothing else is: loading a task runs its code "
                            "[default none]")
    serve_sec = serve.add_argument_group("security (as fedfleet coordinator's; see docs/reliability.md)")
    _add_served_security(serve_sec, admin="every page and endpoint but /v1/health; browsers sign in at /login "
                                          "[default none: $FEDFLEET_ADMIN_TOKEN if set, else open]",
                         unguarded="an admin token")

    data = sub.add_parser("data", help="fetch a data set's files from their official locations")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = data_sub.add_parser("download", help="download and verify the IDX files of mnist or fashion-mnist")
    fetch.add_argument("dataset", choices=["mnist", "fashion-mnist"])
    fetch.add_argument("--to", type=Path, default=None, metavar="DIR",
                       help="folder to fill [default $FEDFLEET_MNIST_DIR / $FEDFLEET_FASHION_MNIST_DIR, "
                            "else ~/.cache/fedfleet/DATASET: where the task looks]")
    fetch.add_argument("--mirror", dest="mirrors", action="append", default=None, type=_url, metavar="URL",
                       help="base URL serving the .gz files, tried instead of the official ones (repeatable) "
                            "[default none: the official ones]")
    fetch.add_argument("--timeout", type=_positive_float, default=60.0, help="seconds per request [default 60]")

    from fedfleet.deploy.cli import add_aws_parser  # no boto3 until `fedfleet aws` runs

    add_aws_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log.setup(args.log_level or ("WARNING" if args.command in ("run", "simulate") else "INFO"))
    try:
        if args.command == "worker":
            from fedfleet.coordinator.security import read_token
            from fedfleet.protocol.client import tls_context
            from fedfleet.worker.agent import WorkerProcess
            from fedfleet.worker.signals import stop_on_signals

            for path in args.data:
                if not path.exists():
                    raise ConfigError(f"--data {path}: no such file or folder", option="data")
            if args.data and args.clients > 1:
                raise ConfigError(f"--data with --clients {args.clients}: one site's data is one worker; start a "
                                  "worker process per site, each with its own --data", option="data")
            proc = WorkerProcess(args.coordinator, args.clients, args.state_dir, args.name, args.give_up,
                                 join_token=read_token(args.join_token_file, "FEDFLEET_JOIN_TOKEN", "join token"),
                                 verify=tls_context(args.ca), allowed_tasks=tuple(args.allowed_tasks),
                                 data=tuple(args.data))
            stop_on_signals(proc.stop)
            if args.metrics_port:
                from fedfleet.worker.metrics import serve as serve_metrics

                serve_metrics(proc.metrics, args.metrics_host, args.metrics_port)
            return proc.run()
        if args.command == "report":
            # Imported here: matplotlib takes a while to load and only this command needs it.
            from fedfleet.report import main as report_main

            return report_main(args.run_dirs, args.out)
        if args.command == "certs":
            from fedfleet.certs import make_certs

            written = make_certs(args.out, args.hosts or ["localhost", "127.0.0.1"], args.days, args.force)
            for path in written:
                print(path)
            return 0
        if args.command == "aws":
            from fedfleet.deploy.cli import run_aws

            return run_aws(args)
        if args.command == "data":
            return _download(args)
        if args.command == "serve":
            return _serve(args)
        if args.command in ("run", "simulate") and os.getcwd() not in sys.path:
            # The coordinator and workers it starts are `python -m fedfleet` here, which imports a task's
            # module from this folder: look here too when checking the task.
            sys.path.append(os.getcwd())
        config = run_config(args)
        if args.command == "coordinator":
            from fedfleet.coordinator.limits import Limits
            from fedfleet.coordinator.security import parse_allowed_hosts, read_token
            from fedfleet.coordinator.server import serve

            limits = Limits(json_body_bytes=args.max_body_bytes, registration_rate=args.registration_rate,
                            registration_burst=args.registration_burst, max_connections=args.max_connections,
                            header_bytes=args.max_header_bytes, header_timeout=args.header_timeout,
                            idle_timeout=args.idle_timeout)
            return serve(config, args.data_dir, args.host, args.port, args.linger,
                         admin_token=read_token(args.admin_token_file, "FEDFLEET_ADMIN_TOKEN", "admin token"),
                         join_token=read_token(args.join_token_file, "FEDFLEET_JOIN_TOKEN", "join token"),
                         tls_cert=args.tls_cert, tls_key=args.tls_key, insecure=args.insecure, limits=limits,
                         allowed_hosts=parse_allowed_hosts(args.allowed_hosts))
        if args.command == "simulate":
            from fedfleet.simulate import simulate

            if args.ray_address is not None and args.backend != "ray":
                raise ConfigError("--ray-address goes with --backend ray", option="ray_address")
            return simulate(config, args.out or _default_out(config), backend=args.backend, executors=args.executors,
                            ray_address=args.ray_address, overwrite=args.overwrite, resume=args.resume,
                            given=_given_options(args), quiet=args.quiet)
        from fedfleet.runner import run_local

        out = args.out or _default_out(config)
        return run_local(config, out, processes=args.processes, overwrite=args.overwrite, quiet=args.quiet,
                         resume=args.resume, given=_given_options(args), data_split=args.data_split)
    except ConfigError as exc:
        _fail(parser, 2, exc)
    except FedfleetError as exc:
        _fail(parser, 1, exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

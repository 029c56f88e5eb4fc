"""``fedfleet aws up|status|down|sync``: fedfleet on EC2 with the CloudFormation template of deploy/aws.

``up`` stores a random join token and admin token as SSM SecureString parameters (the instances read
them with their own narrow IAM roles; they never pass through the template or its parameters),
creates the stack, optionally uploads a wheel for the instances to install, waits and returns the
stack's outputs (the coordinator URL among them). ``status`` reports the stack, the workers, its
sites and the alarms; ``down`` deletes the stack, its sites' stacks and the tokens (the bucket is
retained with the run's files); ``sync`` uploads a run folder's artefacts to the stack's bucket.

``site_up`` adds a site's worker for a run on each site's own data: a small stack of its own (the
template ``fedfleet-site.yaml`` beside this module) whose instance copies ``s3://BUCKET/sites/SITE/``
before every start and trains on it (``fedfleet worker --data``), with a role that may read that prefix
and no other site's; ``site_down`` removes it (the site's files stay in the bucket).

Needs the ``aws`` extra (``pip install 'fedfleet[aws]'``, boto3) and AWS credentials as boto3 finds
them (environment, ``~/.aws``, an instance role).
"""

from __future__ import annotations

import functools
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fedfleet.errors import FedfleetError
from fedfleet.storage.sqlite import Store

TEMPLATE_NAME = "fedfleet.yaml"
# Packaged inside fedfleet.deploy itself (not force-included from deploy/aws/ like the main template).
SITE_TEMPLATE_NAME = "fedfleet-site.yaml"
# The site template's AllowedPattern: a name that is also an S3 prefix, a stack-name suffix and a --name.
SITE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,28}[a-z0-9])?")
# What a site's stack takes from the main stack's outputs, as (output, site template parameter).
SITE_FROM_OUTPUTS = (("ArtefactBucketName", "ArtefactBucket"), ("CoordinatorPrivateUrl", "CoordinatorUrl"),
                     ("PrivateSubnetIds", "PrivateSubnets"), ("WorkerSecurityGroupId", "WorkerSecurityGroup"))
# ... and from its parameters, so that a site's worker installs and authenticates as the stack's do.
SITE_FROM_PARAMETERS = ("TokenParameterPrefix", "FedfleetPackage")
DEFAULT_TOKEN_PREFIX = "/fedfleet"
TOKENS = ("join-token", "admin-token")
# SQLite's side files of a live database: the consistent copy made by _sqlite_snapshot replaces them.
SKIPPED_SUFFIXES = ("-wal", "-shm", "-journal", ".tmp")


class DeployError(FedfleetError):
    """A deployment step failed: no boto3, no credentials, a stack that failed or does not exist."""


def _boto3() -> Any:
    try:
        import boto3  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError as exc:
        raise DeployError("fedfleet aws needs boto3: pip install 'fedfleet[aws]'") from exc
    return boto3


def template_path() -> Path:
    """The CloudFormation template: packaged in the wheel, or deploy/aws/ of a source checkout."""
    packaged = resources.files("fedfleet.deploy").joinpath(TEMPLATE_NAME)
    if packaged.is_file():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[3] / "deploy" / "aws" / TEMPLATE_NAME
    if checkout.is_file():
        return checkout
    raise DeployError(f"the CloudFormation template {TEMPLATE_NAME} is neither in the package nor in deploy/aws/")


def site_template_path() -> Path:
    """The CloudFormation template of one site's worker (``fedfleet-site.yaml``, in this package)."""
    packaged = resources.files("fedfleet.deploy").joinpath(SITE_TEMPLATE_NAME)
    if not packaged.is_file():
        raise DeployError(f"the CloudFormation template {SITE_TEMPLATE_NAME} is missing from fedfleet.deploy")
    return Path(str(packaged))


def site_stack_name(stack: str, site: str) -> str:
    return f"{stack}-site-{site}"


def site_data_uri(bucket: str, site: str) -> str:
    """Where site ``site``'s files go, and the only data its worker's role may read."""
    return f"s3://{bucket}/sites/{site}/"


def token_names(stack: str, prefix: str = DEFAULT_TOKEN_PREFIX) -> dict[str, str]:
    """SSM parameter names of the stack's tokens, as the template's IAM policies name them."""
    return {kind: f"{prefix}/{stack}/{kind}" for kind in TOKENS}


@dataclass
class Session:
    """boto3 clients for one region (tests hand in moto-backed ones through the same boto3)."""

    region: str
    _clients: dict[str, Any] = field(default_factory=dict)

    def client(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = _boto3().client(service, region_name=self.region)
        return self._clients[service]


def _client_error() -> type[Exception]:
    _boto3()
    from botocore.exceptions import ClientError  # type: ignore[import-untyped,import-not-found,unused-ignore]

    return ClientError  # type: ignore[no-any-return,unused-ignore]


def ensure_tokens(session: Session, stack: str, prefix: str = DEFAULT_TOKEN_PREFIX) -> dict[str, str]:
    """Create the join and admin tokens as SecureString parameters unless they exist; return the names."""
    ssm = session.client("ssm")
    client_error = _client_error()
    names = token_names(stack, prefix)
    for kind, name in names.items():
        try:
            ssm.put_parameter(Name=name, Value=secrets.token_urlsafe(32), Type="SecureString", Overwrite=False,
                              Description=f"fedfleet {kind} of stack {stack}")
        except client_error as exc:
            if _error_code(exc) != "ParameterAlreadyExists":
                raise DeployError(f"cannot store the {kind} in SSM parameter {name}: {exc}") from exc
    return names


def read_token(session: Session, stack: str, kind: str, prefix: str = DEFAULT_TOKEN_PREFIX) -> str:
    """A token's value (``join-token`` or ``admin-token``), e.g. for the admin's own requests."""
    name = token_names(stack, prefix)[kind]
    try:
        answer = session.client("ssm").get_parameter(Name=name, WithDecryption=True)
    except _client_error() as exc:
        raise DeployError(f"cannot read SSM parameter {name}: {exc}") from exc
    return str(answer["Parameter"]["Value"])


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def stack_parameters(admin_cidr: str, alarm_email: str = "", token_prefix: str = DEFAULT_TOKEN_PREFIX,
                     extra: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    values = {"AdminCidr": admin_cidr, "AlarmEmail": alarm_email, "TokenParameterPrefix": token_prefix}
    values.update(extra or {})
    return [{"ParameterKey": key, "ParameterValue": str(value)} for key, value in values.items()]


def _wait(check: Callable[[], str | None], what: str, timeout: float, poll: float) -> str:
    """Call ``check`` until it returns a final status; it returns None while still in progress."""
    deadline = time.monotonic() + timeout
    while True:
        status = check()
        if status is not None:
            return status
        if time.monotonic() > deadline:
            raise DeployError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(poll)


def _stack(session: Session, stack: str) -> dict[str, Any] | None:
    try:
        stacks = session.client("cloudformation").describe_stacks(StackName=stack)["Stacks"]
    except _client_error() as exc:
        if "does not exist" in str(exc):
            return None
        raise DeployError(f"cannot describe stack {stack}: {exc}") from exc
    return dict(stacks[0]) if stacks else None


def outputs(session: Session, stack: str) -> dict[str, str]:
    found = _stack(session, stack)
    if found is None:
        raise DeployError(f"no stack named {stack} in {session.region}")
    return {o["OutputKey"]: o["OutputValue"] for o in found.get("Outputs", [])}


def _stack_resource(session: Session, stack: str, logical_id: str) -> dict[str, Any] | None:
    try:
        listed = session.client("cloudformation").describe_stack_resources(StackName=stack)["StackResources"]
    except _client_error() as exc:
        raise DeployError(f"cannot list the resources of stack {stack}: {exc}") from exc
    return next((dict(r) for r in listed if r.get("LogicalResourceId") == logical_id), None)


def bucket_of(session: Session, stack: str) -> str:
    """The stack's artefact bucket, as soon as it exists (before the rest of the stack is done)."""
    res = _stack_resource(session, stack, "ArtefactBucket")
    if res is None or not res.get("PhysicalResourceId"):
        raise DeployError(f"stack {stack} has no artefact bucket (yet)")
    return str(res["PhysicalResourceId"])


def up(session: Session, stack: str, admin_cidr: str, *, alarm_email: str = "",
       token_prefix: str = DEFAULT_TOKEN_PREFIX, parameters: Mapping[str, str] | None = None,
       wheel: Path | None = None, wait: bool = True, timeout: float = 1800.0, poll: float = 15.0,
       template: Path | None = None) -> dict[str, str]:
    """Create the stack (tokens first) and, with ``wait``, return its outputs once it is complete."""
    if _stack(session, stack) is not None:
        raise DeployError(f"stack {stack} already exists in {session.region}; `fedfleet aws status --stack {stack}`")
    extra = dict(parameters or {})
    if wheel is not None:
        if not wheel.is_file() or wheel.suffix != ".whl":
            raise DeployError(f"--wheel {wheel} is not a wheel file")
        extra["FedfleetPackage"] = f"dist/{wheel.name}"
    ensure_tokens(session, stack, token_prefix)
    cfn = session.client("cloudformation")
    try:
        cfn.create_stack(StackName=stack, TemplateBody=(template or template_path()).read_text(),
                         Parameters=stack_parameters(admin_cidr, alarm_email, token_prefix, extra),
                         Capabilities=["CAPABILITY_IAM"], OnFailure="ROLLBACK",
                         Tags=[{"Key": "fedfleet:stack", "Value": stack}])
    except _client_error() as exc:
        raise DeployError(f"CloudFormation refused stack {stack}: {exc}") from exc
    if wheel is not None:
        # The instances wait for this key; it can go up as soon as the bucket exists.
        bucket = _wait(lambda: _resource_ready(session, stack, "ArtefactBucket"), "the artefact bucket", timeout, poll)
        session.client("s3").upload_file(str(wheel), bucket, f"dist/{wheel.name}")
    if not wait:
        return {}
    final = _wait(lambda: _final_status(session, stack), f"stack {stack}", timeout, poll)
    if final != "CREATE_COMPLETE":
        raise DeployError(f"stack {stack} ended in {final}; see its events in the CloudFormation console")
    return outputs(session, stack)


def _resource_ready(session: Session, stack: str, logical_id: str) -> str | None:
    detail = _stack_resource(session, stack, logical_id)
    if detail is None:
        return None
    if str(detail.get("ResourceStatus", "")).endswith("FAILED"):
        raise DeployError(f"{logical_id} of stack {stack} failed: {detail.get('ResourceStatusReason', '')}")
    return str(detail["PhysicalResourceId"]) if detail.get("ResourceStatus") == "CREATE_COMPLETE" else None


def _final_status(session: Session, stack: str) -> str | None:
    found = _stack(session, stack)
    if found is None:
        return "DELETE_COMPLETE"
    status = str(found["StackStatus"])
    return None if status.endswith("_IN_PROGRESS") else status


def site_up(session: Session, stack: str, site: str, *, parameters: Mapping[str, str] | None = None,
            wait: bool = True, timeout: float = 1800.0, poll: float = 15.0,
            template: Path | None = None) -> dict[str, str]:
    """Add site ``site``'s worker to ``stack`` (a complete stack of the main template): a stack of its own,
    named by ``site_stack_name``; with ``wait``, return its outputs (``SiteDataUri`` among them) once complete."""
    if not SITE_NAME.fullmatch(site):
        raise DeployError(f"site name {site!r} must be a-z, 0-9 and - (not first or last), at most 30 characters")
    main = _stack(session, stack)
    if main is None:
        raise DeployError(f"no stack named {stack} in {session.region}: `fedfleet aws up --stack {stack}` first")
    if main["StackStatus"] not in ("CREATE_COMPLETE", "UPDATE_COMPLETE"):
        raise DeployError(f"stack {stack} is {main['StackStatus']}: a site joins a complete stack")
    name = site_stack_name(stack, site)
    if _stack(session, name) is not None:
        raise DeployError(f"site {site} of stack {stack} already exists (stack {name})")
    outs = {o["OutputKey"]: o["OutputValue"] for o in main.get("Outputs", [])}
    missing = [key for key, _ in SITE_FROM_OUTPUTS if key not in outs]
    if missing:
        raise DeployError(f"stack {stack} has no output {', '.join(missing)}: it was made from an older template; "
                          "create it again with this version of fedfleet")
    given = {p["ParameterKey"]: p["ParameterValue"] for p in main.get("Parameters", [])}
    values = {"Site": site, "MainStack": stack} | {param: outs[key] for key, param in SITE_FROM_OUTPUTS}
    values |= {key: given[key] for key in SITE_FROM_PARAMETERS if key in given}
    values |= dict(parameters or {})
    try:
        session.client("cloudformation").create_stack(
            StackName=name, TemplateBody=(template or site_template_path()).read_text(),
            Parameters=[{"ParameterKey": k, "ParameterValue": str(v)} for k, v in values.items()],
            Capabilities=["CAPABILITY_IAM"], OnFailure="ROLLBACK",
            Tags=[{"Key": "fedfleet:stack", "Value": stack}, {"Key": "fedfleet:site", "Value": site}])
    except _client_error() as exc:
        raise DeployError(f"CloudFormation refused stack {name}: {exc}") from exc
    if not wait:
        return {}
    final = _wait(lambda: _final_status(session, name), f"stack {name}", timeout, poll)
    if final != "CREATE_COMPLETE":
        raise DeployError(f"stack {name} ended in {final}; see its events in the CloudFormation console")
    return outputs(session, name)


def sites(session: Session, stack: str) -> dict[str, str]:
    """The sites of ``stack`` (their stacks carry its name and theirs as tags): site name -> stack status."""
    found: dict[str, str] = {}
    try:
        for page in session.client("cloudformation").get_paginator("describe_stacks").paginate():
            for st in page["Stacks"]:
                tags = {t["Key"]: t["Value"] for t in st.get("Tags", [])}
                if tags.get("fedfleet:stack") == stack and "fedfleet:site" in tags:
                    found[tags["fedfleet:site"]] = str(st["StackStatus"])
    except _client_error() as exc:
        raise DeployError(f"cannot list the stacks in {session.region}: {exc}") from exc
    return found


def site_down(session: Session, stack: str, site: str, *, wait: bool = True, timeout: float = 1800.0,
              poll: float = 15.0) -> None:
    """Delete site ``site``'s stack (its worker and role); its files stay in the bucket."""
    name = site_stack_name(stack, site)
    if _stack(session, name) is None:
        raise DeployError(f"stack {stack} has no site {site} (no stack {name} in {session.region})")
    _delete_stacks(session, [name], wait, timeout, poll)


def _delete_stacks(session: Session, names: list[str], wait: bool, timeout: float, poll: float) -> None:
    cfn = session.client("cloudformation")
    for name in names:
        try:
            cfn.delete_stack(StackName=name)
        except _client_error() as exc:
            raise DeployError(f"CloudFormation refused to delete stack {name}: {exc}") from exc
    if not wait:
        return
    for name in names:
        final = _wait(functools.partial(_final_status, session, name), f"deletion of stack {name}", timeout, poll)
        if final != "DELETE_COMPLETE":
            raise DeployError(f"stack {name} could not be deleted: {final}")


@dataclass(frozen=True)
class StackStatus:
    stack: str
    status: str
    outputs: dict[str, str]
    workers_in_service: int
    workers_desired: int
    alarms: dict[str, str]
    sites: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"stack       {self.stack}: {self.status}"]
        out += [f"{key:<11} {value}" for key, value in sorted(self.outputs.items())]
        out.append(f"workers     {self.workers_in_service} in service of {self.workers_desired} desired")
        out += [f"site        {name}: {state}" for name, state in sorted(self.sites.items())]
        out += [f"alarm       {name}: {state}" for name, state in sorted(self.alarms.items())]
        return out


def status(session: Session, stack: str) -> StackStatus:
    found = _stack(session, stack)
    if found is None:
        raise DeployError(f"no stack named {stack} in {session.region}")
    outs = {o["OutputKey"]: o["OutputValue"] for o in found.get("Outputs", [])}
    in_service = desired = 0
    group = outs.get("WorkerGroupName")
    if group:
        groups = session.client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[group])
        for g in groups["AutoScalingGroups"]:
            desired = int(g["DesiredCapacity"])
            in_service = sum(1 for i in g.get("Instances", []) if i.get("LifecycleState") == "InService")
    alarms: dict[str, str] = {}
    resources_ = session.client("cloudformation").describe_stack_resources(StackName=stack)["StackResources"]
    names = [r["PhysicalResourceId"] for r in resources_
             if r.get("ResourceType") == "AWS::CloudWatch::Alarm" and r.get("PhysicalResourceId")]
    if names:
        for alarm in session.client("cloudwatch").describe_alarms(AlarmNames=names)["MetricAlarms"]:
            alarms[alarm["AlarmName"]] = alarm["StateValue"]
    return StackStatus(stack, str(found["StackStatus"]), outs, in_service, desired, alarms, sites(session, stack))


def down(session: Session, stack: str, *, token_prefix: str = DEFAULT_TOKEN_PREFIX, keep_tokens: bool = False,
         wait: bool = True, timeout: float = 1800.0, poll: float = 15.0) -> str | None:
    """Delete the stack, its sites' stacks first (and its tokens); return the retained bucket's name, if
    the stack had one."""
    if _stack(session, stack) is None:
        raise DeployError(f"no stack named {stack} in {session.region}")
    try:
        bucket: str | None = bucket_of(session, stack)
    except DeployError:
        bucket = None
    # The sites' instances sit in this stack's subnets and security group, which cannot go while they run:
    # the sites go first, and are waited for even without ``wait``.
    _delete_stacks(session, [site_stack_name(stack, site) for site in sites(session, stack)], True, timeout, poll)
    _delete_stacks(session, [stack], wait, timeout, poll)
    if not keep_tokens:
        session.client("ssm").delete_parameters(Names=list(token_names(stack, token_prefix).values()))
    return bucket


@dataclass(frozen=True)
class Uploaded:
    key: str
    size: int


def _run_files(run_dir: Path) -> Iterator[Path]:
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and not path.name.endswith(SKIPPED_SUFFIXES):
            yield path


def _sqlite_snapshot(db: Path, into: Path) -> Path:
    """A consistent copy of a SQLite database that a coordinator may still be writing (WAL mode)."""
    copy = into / db.name
    with closing(Store.read_only(db)) as store:
        store.backup(copy)
    return copy


def sync(session: Session, run_dir: Path, bucket: str, prefix: str) -> list[Uploaded]:
    """Upload every artefact of ``run_dir`` (checkpoints, metrics, summary, model, logs, report) to
    ``s3://bucket/prefix/``, keeping the folder layout; SQLite databases go up as consistent copies."""
    if not run_dir.is_dir():
        raise DeployError(f"run dir {run_dir} does not exist")
    s3 = session.client("s3")
    prefix = prefix.strip("/")
    done: list[Uploaded] = []
    with tempfile.TemporaryDirectory(prefix="fedfleet-sync-") as tmp:
        for path in _run_files(run_dir):
            rel = path.relative_to(run_dir).as_posix()
            source = _sqlite_snapshot(path, Path(tmp)) if path.suffix == ".sqlite" else path
            key = f"{prefix}/{rel}" if prefix else rel
            try:
                s3.upload_file(str(source), bucket, key, ExtraArgs={"ServerSideEncryption": "AES256"})
            except Exception as exc:
                raise DeployError(f"cannot upload {path} to s3://{bucket}/{key}: {exc}") from exc
            done.append(Uploaded(key, source.stat().st_size))
    if not done:
        raise DeployError(f"run dir {run_dir} holds no files to upload")
    return done

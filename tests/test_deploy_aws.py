"""deploy/aws: the CloudFormation template (cfn-lint; a walk over it asserting the security rules) and
fedfleet.deploy.aws against moto: the stack is created through the module's functions, its resources
and IAM policies are checked, and a real run folder is synced to the stack's bucket."""

from __future__ import annotations

import ast
import base64
import fnmatch
import json
import re
import sqlite3
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("boto3")
moto = pytest.importorskip("moto")

from fedfleet.cli import main as cli_main  # noqa: E402
from fedfleet.deploy import aws  # noqa: E402

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "aws" / "fedfleet.yaml"
SITE_TEMPLATE = Path(__file__).resolve().parents[1] / "src" / "fedfleet" / "deploy" / "fedfleet-site.yaml"
ADMIN_CIDR = "203.0.113.7/32"
STACK = "fl-test"
CFN_LINT = Path(sys.executable).with_name("cfn-lint")  # installed with the dev extra


class _CfnLoader(yaml.SafeLoader):
    """Reads CloudFormation's short tags (!Ref, !Sub, ...) as {"Ref": ...} / {"Fn::Sub": ...}."""


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {name: value}


_CfnLoader.add_multi_constructor("!", _tag)


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return dict(yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader))


@pytest.fixture(scope="module")
def site_template() -> dict[str, Any]:
    return dict(yaml.load(SITE_TEMPLATE.read_text(), Loader=_CfnLoader))


def resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def statements(template: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, role in resources(template, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            for st in policy["PolicyDocument"]["Statement"]:
                yield name, st


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# --- the template, statically ----------------------------------------------------------------------

@pytest.mark.parametrize("path", [TEMPLATE, SITE_TEMPLATE], ids=["stack", "site"])
def test_cfn_lint_is_clean(path: Path) -> None:
    done = subprocess.run([str(CFN_LINT), str(path)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cfn_lint_catches_a_broken_template(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(TEMPLATE.read_text().replace("Type: AWS::EC2::VPC\n", "Type: AWS::EC2::Vpcc\n", 1))
    done = subprocess.run([str(CFN_LINT), str(broken)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode != 0 and "Vpcc" in done.stdout


def test_iam_allows_no_s3_wildcards_and_no_star_resource_where_a_name_is_known(
        template: dict[str, Any], site_template: dict[str, Any]) -> None:
    seen = 0
    for role, st in [*statements(template), *statements(site_template)]:
        assert st["Effect"] == "Allow", role
        actions = as_list(st["Action"])
        assert all("*" not in a for a in actions), f"{role}: wildcard action in {actions}"
        res = as_list(st["Resource"])
        if "*" in res:
            # Only for actions that have no resource-level permissions, and then pinned by a condition.
            assert actions == ["cloudwatch:PutMetricData"] and st.get("Condition"), f"{role}: Resource * for {actions}"
        if any(a.startswith("s3:") for a in actions):
            assert "*" not in res
            for r in res:
                assert "ArtefactBucket" in json.dumps(r), f"{role}: S3 access outside the stack's bucket: {r}"
        seen += 1
    assert seen >= 10


def test_workers_get_only_the_join_token_the_ca_and_the_package(template: dict[str, Any]) -> None:
    worker = [st for role, st in statements(template) if role == "WorkerRole"]
    actions = sorted(a for st in worker for a in as_list(st["Action"]))
    assert actions == ["s3:GetObject", "ssm:GetParameter"]
    text = json.dumps(worker)
    assert "join-token" in text and "admin-token" not in text
    assert "runs/" not in text  # workers cannot read or write the run's artefacts


def test_no_role_of_the_stack_reads_the_sites_data(template: dict[str, Any]) -> None:
    # The sites' files (sites/SITE/) are for each site's own worker (fedfleet-site.yaml) alone.
    assert "sites/" not in json.dumps([st for _, st in statements(template)])


def test_site_role_reads_its_own_prefix_and_what_any_worker_reads(site_template: dict[str, Any]) -> None:
    assert set(resources(site_template, "AWS::IAM::Role")) == {"SiteRole"}
    by_sid = {st["Sid"]: st for _, st in statements(site_template)}
    assert set(by_sid) == {"ReadJoinToken", "ReadCaAndPackage", "ReadOwnSiteData", "ListOwnSitePrefix"}
    assert by_sid["ReadOwnSiteData"]["Action"] == "s3:GetObject"
    assert by_sid["ReadOwnSiteData"]["Resource"] == {
        "Fn::Sub": "arn:${AWS::Partition}:s3:::${ArtefactBucket}/sites/${Site}/*"}
    listing = by_sid["ListOwnSitePrefix"]
    assert listing["Action"] == "s3:ListBucket"
    assert listing["Resource"] == {"Fn::Sub": "arn:${AWS::Partition}:s3:::${ArtefactBucket}"}
    assert listing["Condition"] == {"StringLike": {"s3:prefix": [{"Fn::Sub": "sites/${Site}/"},
                                                                 {"Fn::Sub": "sites/${Site}/*"}]}}
    text = json.dumps(by_sid)
    assert "join-token" in text and "admin-token" not in text and "runs/" not in text
    assert "s3:PutObject" not in text  # a site's worker writes nothing to the bucket


def test_site_instance_copies_its_data_before_every_start_and_trains_on_it(site_template: dict[str, Any]) -> None:
    (lt,) = resources(site_template, "AWS::EC2::LaunchTemplate").values()
    data = lt["Properties"]["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert all(b["Ebs"]["Encrypted"] for b in data["BlockDeviceMappings"])
    script = data["UserData"]["Fn::Base64"]["Fn::Sub"]
    assert 'aws s3 sync "s3://$BUCKET/sites/$SITE/" /var/lib/fedfleet/data --delete' in script
    assert "ExecStartPre=+/usr/local/bin/fedfleet-site-data" in script
    (start,) = [line.strip() for line in script.splitlines() if line.strip().startswith("ExecStart=")]
    assert "fedfleet worker --coordinator ${CoordinatorUrl} --ca /etc/fedfleet/ca.pem" in start
    assert "--data /var/lib/fedfleet/data --name $SITE" in start and "--clients" not in start
    # The worker may write only its state; the data is root's and read-only to it (ProtectSystem=strict).
    assert "ReadWritePaths=/var/lib/fedfleet/state\n" in script and "ProtectSystem=strict" in script
    (group,) = resources(site_template, "AWS::AutoScaling::AutoScalingGroup").values()
    p = group["Properties"]
    assert (p["MinSize"], p["MaxSize"], p["DesiredCapacity"]) == ("1", "1", "1")
    assert p["VPCZoneIdentifier"] == {"Ref": "PrivateSubnets"}
    assert site_template["Parameters"]["Site"]["AllowedPattern"] == "^" + aws.SITE_NAME.pattern + "$"


def test_coordinator_options_cannot_break_out_of_the_command_line(template: dict[str, Any]) -> None:
    param = template["Parameters"]["CoordinatorOptions"]
    pattern = re.compile(param["AllowedPattern"])
    assert pattern.fullmatch("--task-option label=era --data-source sites --test-data /srv/t.csv")
    for bad in ("; rm -rf /", "$(id)", "`id`", "a\nExecStartPre=/bin/sh", "%n", "'x'", "a|b", "a&b"):
        assert not pattern.fullmatch(bad), bad
    script = template["Resources"]["CoordinatorInstance"]["Properties"]["UserData"]["Fn::Base64"]["Fn::Sub"]
    (start,) = [line.strip() for line in script.splitlines() if line.strip().startswith("ExecStart=")]
    assert start.endswith(" ${CoordinatorOptions}")


def test_security_groups_open_only_the_coordinator_port_to_workers_and_admin(template: dict[str, Any]) -> None:
    groups = resources(template, "AWS::EC2::SecurityGroup")
    assert all("SecurityGroupIngress" not in g["Properties"] for g in groups.values())
    ingress = resources(template, "AWS::EC2::SecurityGroupIngress")
    assert len(ingress) == 2
    sources = set()
    for rule in ingress.values():
        p = rule["Properties"]
        assert p["GroupId"] == {"Ref": "CoordinatorSecurityGroup"}
        assert (p["IpProtocol"], p["FromPort"], p["ToPort"]) == ("tcp", 8080, 8080)
        sources.add(json.dumps(p.get("SourceSecurityGroupId") or p.get("CidrIp")))
    assert sources == {json.dumps({"Ref": "WorkerSecurityGroup"}), json.dumps({"Ref": "AdminCidr"})}
    assert "0.0.0.0/0" not in TEMPLATE.read_text().split("AdminCidr:")[1].split("\n\n")[0]
    for g in groups.values():
        for rule in g["Properties"].get("SecurityGroupEgress", []):
            assert rule["FromPort"] == rule["ToPort"] == 443


def test_bucket_is_encrypted_private_and_tls_only(template: dict[str, Any]) -> None:
    (bucket,) = resources(template, "AWS::S3::Bucket").values()
    p = bucket["Properties"]
    rule = p["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    assert rule["SSEAlgorithm"] in {"AES256", "aws:kms"}
    assert p["PublicAccessBlockConfiguration"] == {"BlockPublicAcls": True, "BlockPublicPolicy": True,
                                                   "IgnorePublicAcls": True, "RestrictPublicBuckets": True}
    assert p["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    (policy,) = resources(template, "AWS::S3::BucketPolicy").values()
    (deny,) = policy["Properties"]["PolicyDocument"]["Statement"]
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_scaling_alarms_storage_and_instances(template: dict[str, Any]) -> None:
    (group,) = resources(template, "AWS::AutoScaling::AutoScalingGroup").values()
    for key, param in (("MinSize", "WorkerMinSize"), ("MaxSize", "WorkerMaxSize"),
                       ("DesiredCapacity", "WorkerDesiredCapacity")):
        assert group["Properties"][key] == {"Ref": param}
    (policy,) = resources(template, "AWS::AutoScaling::ScalingPolicy").values()
    tt = policy["Properties"]["TargetTrackingConfiguration"]
    assert policy["Properties"]["PolicyType"] == "TargetTrackingScaling"
    assert tt["PredefinedMetricSpecification"]["PredefinedMetricType"] == "ASGAverageCPUUtilization"
    alarms = resources(template, "AWS::CloudWatch::Alarm")
    assert len(alarms) >= 3
    assert all({"Ref": "AlarmTopic"} in a["Properties"]["AlarmActions"] for a in alarms.values())
    sub = resources(template, "AWS::SNS::Subscription")["AlarmSubscription"]["Properties"]
    assert sub["Protocol"] == "email" and sub["Endpoint"] == {"Ref": "AlarmEmail"}
    (volume,) = resources(template, "AWS::EC2::Volume").values()
    assert volume["Properties"]["Encrypted"] is True and volume["DeletionPolicy"] in {"Snapshot", "Retain"}
    for lt in resources(template, "AWS::EC2::LaunchTemplate").values():
        data = lt["Properties"]["LaunchTemplateData"]
        assert data["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv2 only
        assert all(b["Ebs"]["Encrypted"] for b in data["BlockDeviceMappings"])
    assert "22" not in {str(r["Properties"]["FromPort"]) for r in
                        resources(template, "AWS::EC2::SecurityGroupIngress").values()}


# --- the stack, in moto --------------------------------------------------------------------------

@pytest.fixture
def session() -> Iterator[aws.Session]:
    with moto.mock_aws(), warnings.catch_warnings():
        # moto skips the resource types it does not model (alarms, scaling policy, ...), with a warning.
        warnings.simplefilter("ignore", UserWarning)
        yield aws.Session("us-east-1")


def test_up_creates_the_stack_tokens_roles_and_network(session: aws.Session, tmp_path: Path) -> None:
    wheel = tmp_path / "fedfleet-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    outs = aws.up(session, STACK, ADMIN_CIDR, alarm_email="ops@example.com", wheel=wheel, poll=0.01, timeout=30,
                  parameters={"WorkerDesiredCapacity": "3", "WorkerMinSize": "1"})
    assert outs["CoordinatorPrivateUrl"].startswith("https://10.42.0.")
    bucket = outs["ArtefactBucketName"]
    assert bucket == aws.bucket_of(session, STACK)

    # Tokens: random SecureStrings at the names the IAM policies grant, never in the template.
    ssm = session.client("ssm")
    values = []
    for name in aws.token_names(STACK).values():
        param = ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]
        assert param["Type"] == "SecureString" and len(param["Value"]) >= 32
        values.append(param["Value"])
    assert values[0] != values[1]
    assert aws.read_token(session, STACK, "admin-token") == values[1]
    params = session.client("cloudformation").describe_stacks(StackName=STACK)["Stacks"][0]["Parameters"]
    assert all(v not in json.dumps(params) for v in values)

    # The wheel went to the bucket, where the instances' FedfleetPackage points.
    s3 = session.client("s3")
    assert s3.head_object(Bucket=bucket, Key=f"dist/{wheel.name}")["ContentLength"] == wheel.stat().st_size
    assert {"ParameterKey": "FedfleetPackage", "ParameterValue": f"dist/{wheel.name}"} in params
    enc = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert enc["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"

    # IAM: one inline policy per role, nothing broader than the template says.
    iam = session.client("iam")
    roles = {r["RoleName"]: r for r in iam.list_roles()["Roles"] if r["RoleName"].startswith(STACK)}
    docs = {}
    for name in roles:
        (policy,) = iam.list_role_policies(RoleName=name)["PolicyNames"]
        doc = iam.get_role_policy(RoleName=name, PolicyName=policy)["PolicyDocument"]
        docs[policy] = _policy(doc)
    assert set(docs) == {"fedfleet-coordinator", "fedfleet-worker"}
    account = "123456789012"
    worker_resources = [r for st in docs["fedfleet-worker"]["Statement"] for r in as_list(st["Resource"])]
    assert f"arn:aws:ssm:us-east-1:{account}:parameter/fedfleet/{STACK}/join-token" in worker_resources
    assert f"arn:aws:s3:::{bucket}/tls/ca.pem" in worker_resources
    coordinator_resources = [r for st in docs["fedfleet-coordinator"]["Statement"] for r in as_list(st["Resource"])]
    assert f"arn:aws:s3:::{bucket}/runs/{STACK}/*" in coordinator_resources
    for doc in docs.values():
        for st in doc["Statement"]:
            assert "s3:*" not in as_list(st["Action"])

    # Network and machines.
    ec2 = session.client("ec2")
    subnets = ec2.describe_subnets(Filters=[{"Name": "cidr-block", "Values": ["10.42.0.0/24", "10.42.1.0/24",
                                                                              "10.42.2.0/24"]}])["Subnets"]
    assert len(subnets) == 3
    groups = {g["GroupName"]: g for g in ec2.describe_security_groups()["SecurityGroups"]
              if g["GroupName"].startswith(STACK)}
    coord_sg = next(g for n, g in groups.items() if "Coordinator" in n)
    worker_sg = next(g for n, g in groups.items() if "Worker" in n)
    (perm,) = coord_sg["IpPermissions"]
    assert (perm["FromPort"], perm["ToPort"]) == (8080, 8080)
    assert [r["CidrIp"] for r in perm["IpRanges"]] == [ADMIN_CIDR]
    assert [p["GroupId"] for p in perm["UserIdGroupPairs"]] == [worker_sg["GroupId"]]
    assert worker_sg["IpPermissions"] == []
    volume_id = aws._stack_resource(session, STACK, "DataVolume")["PhysicalResourceId"]  # type: ignore[index]
    (volume,) = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]
    assert volume["Size"] == 20  # encryption: moto drops it; test_scaling_alarms_storage_and_instances checks it
    (group,) = session.client("autoscaling").describe_auto_scaling_groups()["AutoScalingGroups"]
    assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == (1, 8, 3)
    topics = session.client("sns").list_topics()["Topics"]
    assert any("AlarmTopic" in t["TopicArn"] for t in topics)

    status = aws.status(session, STACK)
    assert status.status == "CREATE_COMPLETE" and status.workers_desired == 3
    assert any(line.startswith("workers") for line in status.lines())

    with pytest.raises(aws.DeployError, match="already exists"):
        aws.up(session, STACK, ADMIN_CIDR, poll=0.01, timeout=30)


def _policy(doc: Any) -> dict[str, Any]:
    """A policy document as boto3 returns it: a dict, or (moto, for CloudFormation-made roles) its repr."""
    if isinstance(doc, dict):
        return doc
    try:
        return dict(json.loads(doc))
    except json.JSONDecodeError:
        return dict(ast.literal_eval(doc))


def _run_dir(path: Path) -> Path:
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "round-0003.safetensors").write_bytes(b"\x08" * 64)
    (path / "metrics.jsonl").write_text('{"round": 1, "accuracy": 0.6}\n')
    (path / "summary.json").write_text('{"state": "finished"}')
    db = sqlite3.connect(path / "state.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE rounds (n INTEGER)")
    db.executemany("INSERT INTO rounds VALUES (?)", [(i,) for i in range(5)])
    db.commit()  # left open: its -wal side file exists, as under a live coordinator
    (path / "state.sqlite-wal").exists()
    path.joinpath("logs").mkdir()
    (path / "logs" / "coordinator.log").write_text("run.finished\n")
    return path


def test_sync_uploads_a_run_folder(session: aws.Session, tmp_path: Path) -> None:
    outs = aws.up(session, STACK, ADMIN_CIDR, poll=0.01, timeout=30)
    bucket = outs["ArtefactBucketName"]
    run = _run_dir(tmp_path / "songs-iid")
    uploaded = aws.sync(session, run, bucket, f"runs/{STACK}/songs-iid/")
    keys = sorted(u.key for u in uploaded)
    prefix = f"runs/{STACK}/songs-iid"
    assert keys == [f"{prefix}/checkpoints/round-0003.safetensors", f"{prefix}/logs/coordinator.log",
                    f"{prefix}/metrics.jsonl", f"{prefix}/state.sqlite", f"{prefix}/summary.json"]
    s3 = session.client("s3")
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"])
    assert listed == keys
    body = s3.get_object(Bucket=bucket, Key=f"{prefix}/metrics.jsonl")["Body"].read()
    assert body == (run / "metrics.jsonl").read_bytes()
    head = s3.head_object(Bucket=bucket, Key=f"{prefix}/summary.json")
    assert head["ServerSideEncryption"] == "AES256"
    # The database goes up as a consistent copy that holds every committed row.
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(s3.get_object(Bucket=bucket, Key=f"{prefix}/state.sqlite")["Body"].read())
    assert sqlite3.connect(copy).execute("SELECT count(*) FROM rounds").fetchone() == (5,)

    # The CLI does the same for a stack by name, with the default prefix.
    assert cli_main(["aws", "--region", "us-east-1", "sync", str(run), "--stack", STACK]) == 0
    assert s3.list_objects_v2(Bucket=bucket, Prefix="runs/songs-iid/")["KeyCount"] == 5

    with pytest.raises(aws.DeployError, match="does not exist"):
        aws.sync(session, tmp_path / "missing", bucket, "runs/x")


def test_down_deletes_the_stack_and_its_tokens(session: aws.Session, tmp_path: Path) -> None:
    # moto cannot order the deletion of a whole VPC, so this uses a template with just the bucket.
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({
        "Parameters": {k: {"Type": "String", "Default": ""} for k in ("AdminCidr", "AlarmEmail",
                                                                      "TokenParameterPrefix")},
        "Resources": {"ArtefactBucket": {"Type": "AWS::S3::Bucket"}},
        "Outputs": {"ArtefactBucketName": {"Value": {"Ref": "ArtefactBucket"}}},
    }))
    outs = aws.up(session, STACK, ADMIN_CIDR, template=small, poll=0.01, timeout=30)
    assert aws.down(session, STACK, poll=0.01, timeout=30) == outs["ArtefactBucketName"]
    assert session.client("ssm").get_parameters(Names=list(aws.token_names(STACK).values()))["Parameters"] == []
    with pytest.raises(aws.DeployError, match="no stack"):
        aws.status(session, STACK)
    with pytest.raises(aws.DeployError, match="no stack"):
        aws.down(session, STACK)


def test_the_template_is_what_the_module_uses() -> None:
    assert aws.template_path().read_text() == TEMPLATE.read_text()
    assert aws.site_template_path() == SITE_TEMPLATE


# --- each site's own data: a stack per site, in moto ---------------------------------------------

def _allowed(doc: dict[str, Any], action: str, resource: str, prefix: str | None = None) -> bool:
    """Whether an identity policy of Allow statements grants ``action`` on ``resource`` (IAM's * and ?
    wildcards, a StringLike condition on s3:prefix): enough to check what a site's role may read."""
    for st in doc["Statement"]:
        if st["Effect"] != "Allow" or action not in as_list(st["Action"]):
            continue
        if not any(fnmatch.fnmatchcase(resource, pattern) for pattern in as_list(st["Resource"])):
            continue
        condition = st.get("Condition", {})
        assert set(condition) <= {"StringLike"}, condition  # anything else: extend this evaluator first
        wanted = as_list(condition.get("StringLike", {}).get("s3:prefix", []))
        if wanted and (prefix is None or not any(fnmatch.fnmatchcase(prefix, p) for p in wanted)):
            continue
        return True
    return False


def _role_policy(session: aws.Session, stack: str) -> dict[str, Any]:
    iam = session.client("iam")
    (role,) = [r["RoleName"] for r in iam.list_roles()["Roles"] if r["RoleName"].startswith(f"{stack}-")]
    (name,) = iam.list_role_policies(RoleName=role)["PolicyNames"]
    return _policy(iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"])


def test_site_up_gives_each_site_a_worker_that_reads_only_its_own_prefix(session: aws.Session) -> None:
    outs = aws.up(session, STACK, ADMIN_CIDR, poll=0.01, timeout=30, parameters={
        "Task": "tabular", "Partitions": "2", "MinWorkers": "2", "WorkerMinSize": "0", "WorkerDesiredCapacity": "0",
        "CoordinatorOptions": "--task-option label=era --data-source sites"})
    bucket = outs["ArtefactBucketName"]
    # Two sites whose names share a beginning: "a" must not read "ab"'s files.
    site_outs = {site: aws.site_up(session, STACK, site, poll=0.01, timeout=30) for site in ("a", "ab")}
    assert {s: o["SiteDataUri"] for s, o in site_outs.items()} == {
        "a": f"s3://{bucket}/sites/a/", "ab": f"s3://{bucket}/sites/ab/"}
    assert aws.site_data_uri(bucket, "a") == site_outs["a"]["SiteDataUri"]
    assert aws.sites(session, STACK) == {"a": "CREATE_COMPLETE", "ab": "CREATE_COMPLETE"}

    account = "123456789012"
    for site, other in (("a", "ab"), ("ab", "a")):
        doc = _role_policy(session, aws.site_stack_name(STACK, site))
        obj = f"arn:aws:s3:::{bucket}/sites/{{}}/visits.csv"
        assert _allowed(doc, "s3:GetObject", obj.format(site))
        assert _allowed(doc, "s3:GetObject", f"arn:aws:s3:::{bucket}/sites/{site}/2026/part-0.parquet")
        assert not _allowed(doc, "s3:GetObject", obj.format(other))
        assert not _allowed(doc, "s3:GetObject", f"arn:aws:s3:::{bucket}/runs/{STACK}/state.sqlite")
        assert not _allowed(doc, "s3:PutObject", obj.format(site))
        assert _allowed(doc, "s3:ListBucket", f"arn:aws:s3:::{bucket}", prefix=f"sites/{site}/")
        for prefix in (f"sites/{other}/", "sites/", "", None):
            assert not _allowed(doc, "s3:ListBucket", f"arn:aws:s3:::{bucket}", prefix=prefix), prefix
        assert _allowed(doc, "s3:GetObject", f"arn:aws:s3:::{bucket}/tls/ca.pem")
        token = f"arn:aws:ssm:us-east-1:{account}:parameter/fedfleet/{STACK}/{{}}"
        assert _allowed(doc, "ssm:GetParameter", token.format("join-token"))
        assert not _allowed(doc, "ssm:GetParameter", token.format("admin-token"))
    # Neither the coordinator nor the stack's own workers may read any site's files.
    iam = session.client("iam")
    for role in iam.list_roles()["Roles"]:
        name = role["RoleName"]
        if name.startswith(f"{STACK}-") and "-site-" not in name:
            for policy in iam.list_role_policies(RoleName=name)["PolicyNames"]:
                doc = _policy(iam.get_role_policy(RoleName=name, PolicyName=policy)["PolicyDocument"])
                assert not _allowed(doc, "s3:GetObject", f"arn:aws:s3:::{bucket}/sites/a/visits.csv"), name

    # Each site: one instance in the stack's private subnets, with its worker set up for its prefix.
    groups = session.client("autoscaling").describe_auto_scaling_groups()["AutoScalingGroups"]
    main_group = next(g for g in groups if g["AutoScalingGroupName"] == outs["WorkerGroupName"])
    assert main_group["DesiredCapacity"] == 0  # no partition workers in a run on the sites' data
    ec2 = session.client("ec2")
    for site, site_out in site_outs.items():
        (group,) = [g for g in groups if g["AutoScalingGroupName"] == site_out["SiteGroupName"]]
        assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == (1, 1, 1)
        assert set(group["VPCZoneIdentifier"].split(",")) == set(outs["PrivateSubnetIds"].split(","))
        assert ("fedfleet:site", site) in [(t["Key"], t["Value"]) for t in group["Tags"]]
        template_id = group["LaunchTemplate"]["LaunchTemplateId"]
        (version,) = ec2.describe_launch_template_versions(LaunchTemplateId=template_id)["LaunchTemplateVersions"]
        data = version["LaunchTemplateData"]
        assert data["SecurityGroupIds"] == [outs["WorkerSecurityGroupId"]]
        script = base64.b64decode(data["UserData"]).decode()
        assert f"SITE='{site}'" in script and f"BUCKET='{bucket}'" in script
        assert f"--coordinator {outs['CoordinatorPrivateUrl']} " in script

    status = aws.status(session, STACK)
    assert status.sites == {"a": "CREATE_COMPLETE", "ab": "CREATE_COMPLETE"}
    assert "site        a: CREATE_COMPLETE" in status.lines()

    with pytest.raises(aws.DeployError, match="already exists"):
        aws.site_up(session, STACK, "a", poll=0.01, timeout=30)
    with pytest.raises(aws.DeployError, match="must be a-z"):
        aws.site_up(session, STACK, "Site_A", poll=0.01, timeout=30)
    with pytest.raises(aws.DeployError, match="no stack named nope"):
        aws.site_up(session, "nope", "a", poll=0.01, timeout=30)

    aws.site_down(session, STACK, "ab", poll=0.01, timeout=30)
    assert aws.sites(session, STACK) == {"a": "CREATE_COMPLETE"}
    with pytest.raises(aws.DeployError, match="has no site ab"):
        aws.site_down(session, STACK, "ab", poll=0.01, timeout=30)


def test_site_up_through_the_cli(session: aws.Session, capsys: pytest.CaptureFixture[str]) -> None:
    aws.up(session, STACK, ADMIN_CIDR, poll=0.01, timeout=30)
    assert cli_main(["aws", "--region", "us-east-1", "site-up", "--stack", STACK, "--site", "lab-c",
                     "--param", "InstanceType=t3.small", "--no-wait"]) == 0
    assert "creating" in capsys.readouterr().out
    params = session.client("cloudformation").describe_stacks(
        StackName=aws.site_stack_name(STACK, "lab-c"))["Stacks"][0]["Parameters"]
    given = {p["ParameterKey"]: p["ParameterValue"] for p in params}
    assert given["InstanceType"] == "t3.small" and given["Site"] == "lab-c" and given["MainStack"] == STACK
    assert cli_main(["aws", "--region", "us-east-1", "site-down", "--stack", STACK, "--site", "lab-c"]) == 0
    assert "files stay in the bucket under sites/lab-c/" in capsys.readouterr().out


def test_down_deletes_the_sites_first(session: aws.Session, tmp_path: Path) -> None:
    # Small stand-ins, as in test_down_deletes_the_stack_and_its_tokens (moto cannot delete a whole VPC):
    # a main stack with the outputs a site needs, and sites of just their role.
    main = tmp_path / "main.yaml"
    main.write_text(yaml.safe_dump({
        "Parameters": {k: {"Type": "String", "Default": ""} for k in ("AdminCidr", "AlarmEmail",
                                                                      "TokenParameterPrefix")},
        "Resources": {"ArtefactBucket": {"Type": "AWS::S3::Bucket"}},
        "Outputs": {"ArtefactBucketName": {"Value": {"Ref": "ArtefactBucket"}},
                    **{k: {"Value": v} for k, v in (("CoordinatorPrivateUrl", "https://10.42.0.9:8080"),
                                                    ("PrivateSubnetIds", "subnet-1,subnet-2"),
                                                    ("WorkerSecurityGroupId", "sg-1"))}},
    }))
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({
        "Parameters": {k: {"Type": "String", "Default": ""} for k in (
            "Site", "MainStack", "ArtefactBucket", "CoordinatorUrl", "PrivateSubnets", "WorkerSecurityGroup",
            "TokenParameterPrefix")},
        "Resources": {"SiteRole": {"Type": "AWS::IAM::Role", "Properties": {"AssumeRolePolicyDocument": {
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                                                    "Action": "sts:AssumeRole"}]}}}},
    }))
    aws.up(session, STACK, ADMIN_CIDR, template=main, poll=0.01, timeout=30)
    for name in ("a", "b"):
        aws.site_up(session, STACK, name, template=site, poll=0.01, timeout=30)
    aws.up(session, "other", ADMIN_CIDR, template=main, poll=0.01, timeout=30)
    aws.site_up(session, "other", "a", template=site, poll=0.01, timeout=30)
    assert set(aws.sites(session, STACK)) == {"a", "b"}

    aws.down(session, STACK, poll=0.01, timeout=30)
    assert aws.sites(session, STACK) == {}
    assert aws.sites(session, "other") == {"a": "CREATE_COMPLETE"}  # another stack's site is left alone
    names = [s["StackName"] for s in session.client("cloudformation").describe_stacks()["Stacks"]]
    assert sorted(names) == ["other", "other-site-a"]

"""deploy/aws: the CloudFormation template (cfn-lint; a walk over it asserting the security rules) and
fedfleet.deploy.aws against moto: the stack is created through the module's functions, its resources
and IAM policies are checked, and a real run folder is synced to the stack's bucket."""

from __future__ import annotations

import ast
import json
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

def test_cfn_lint_is_clean() -> None:
    done = subprocess.run([str(CFN_LINT), str(TEMPLATE)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cfn_lint_catches_a_broken_template(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(TEMPLATE.read_text().replace("Type: AWS::EC2::VPC\n", "Type: AWS::EC2::Vpcc\n", 1))
    done = subprocess.run([str(CFN_LINT), str(broken)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode != 0 and "Vpcc" in done.stdout


def test_iam_allows_no_s3_wildcards_and_no_star_resource_where_a_name_is_known(template: dict[str, Any]) -> None:
    seen = 0
    for role, st in statements(template):
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
    assert seen >= 6


def test_workers_get_only_the_join_token_the_ca_and_the_package(template: dict[str, Any]) -> None:
    worker = [st for role, st in statements(template) if role == "WorkerRole"]
    actions = sorted(a for st in worker for a in as_list(st["Action"]))
    assert actions == ["s3:GetObject", "ssm:GetParameter"]
    text = json.dumps(worker)
    assert "join-token" in text and "admin-token" not in text
    assert "runs/" not in text  # workers cannot read or write the run's artefacts


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

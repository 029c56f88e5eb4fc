"""The ``fedfleet aws`` subcommands; boto3 is imported only when one of them runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedfleet.errors import ConfigError


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"must look like KEY=VALUE. Got {text!r} instead")
    return key, value


def add_aws_parser(sub: Any) -> None:
    aws = sub.add_parser("aws", help="fedfleet on AWS: a CloudFormation stack, its tokens and S3 artefacts")
    aws.add_argument("--region", default=None, help="AWS region (default: boto3's, e.g. AWS_REGION)")
    cmds = aws.add_subparsers(dest="aws_command", required=True, metavar="ACTION")

    up = cmds.add_parser("up", help="store tokens, create the stack, wait, print the coordinator URL")
    up.add_argument("--stack", required=True, help="stack name (also names the tokens and the S3 prefix)")
    up.add_argument("--admin-cidr", required=True, help="the network allowed to reach the coordinator, e.g. 1.2.3.4/32")
    up.add_argument("--alarm-email", default="", help="address subscribed to the alarms' SNS topic [default none]")
    up.add_argument("--param", dest="params", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                    help="a template parameter, e.g. WorkerDesiredCapacity=4 (repeatable; deploy/aws/fedfleet.yaml) "
                         "[default none: the template's defaults]")
    up.add_argument("--wheel", type=Path, default=None,
                    help="a fedfleet wheel (python -m build) for the instances to install from the stack's bucket "
                         "[default none: they pip install fedfleet]")
    up.add_argument("--no-wait", action="store_true", help="return once CloudFormation has the request")

    status = cmds.add_parser("status", help="the stack, its outputs, workers in service and alarms")
    status.add_argument("--stack", required=True)

    down = cmds.add_parser("down", help="delete the stack and its tokens (the bucket and its artefacts stay)")
    down.add_argument("--stack", required=True)
    down.add_argument("--keep-tokens", action="store_true", help="keep the SSM token parameters")

    site_up = cmds.add_parser("site-up", help="add a site's worker to a stack: it trains on the site's own files, "
                                              "copied from s3://BUCKET/sites/SITE/, and may read nothing else")
    site_up.add_argument("--stack", required=True, help="the stack (fedfleet aws up) whose coordinator the site joins")
    site_up.add_argument("--site", required=True,
                         help="the site's name: its S3 prefix sites/SITE/, its worker's --name and its stack "
                              "STACK-site-SITE (a-z, 0-9, -)")
    site_up.add_argument("--param", dest="params", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                         help="a parameter of the site template, e.g. InstanceType=c6i.xlarge (repeatable; "
                              "src/fedfleet/deploy/fedfleet-site.yaml) [default none: from the stack and the template]")
    site_up.add_argument("--no-wait", action="store_true", help="return once CloudFormation has the request")

    site_down = cmds.add_parser("site-down", help="remove a site's worker and role (its files stay in the bucket)")
    site_down.add_argument("--stack", required=True)
    site_down.add_argument("--site", required=True)

    sync = cmds.add_parser("sync", help="upload a run folder's artefacts to the stack's S3 bucket")
    sync.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="fedfleet run --out or coordinator --data-dir")
    target = sync.add_mutually_exclusive_group(required=True)
    target.add_argument("--stack", help="upload to this stack's bucket")
    target.add_argument("--bucket", help="upload to this bucket")
    sync.add_argument("--prefix", default=None, help="key prefix (default runs/RUN_DIR_NAME)")


def _region(args: argparse.Namespace) -> str:
    if args.region:
        return str(args.region)
    from fedfleet.deploy.aws import _boto3

    region = _boto3().session.Session().region_name
    if not region:
        raise ConfigError("The 'region' option is needed: pass --region or set AWS_REGION.", option="region")
    return str(region)


def run_aws(args: argparse.Namespace) -> int:
    from fedfleet.deploy import aws

    session = aws.Session(_region(args))
    if args.aws_command == "up":
        outs = aws.up(session, args.stack, args.admin_cidr, alarm_email=args.alarm_email,
                      parameters=dict(args.params), wheel=args.wheel, wait=not args.no_wait)
        if not outs:
            print(f"stack {args.stack}: creating; `fedfleet aws status --stack {args.stack}` tells when it is done")
            return 0
        for key, value in sorted(outs.items()):
            print(f"{key:<22} {value}")
        name = aws.token_names(args.stack)["admin-token"]
        print(f"admin token: aws ssm get-parameter --with-decryption --name {name}")
        return 0
    if args.aws_command == "status":
        print("\n".join(aws.status(session, args.stack).lines()))
        return 0
    if args.aws_command == "down":
        bucket = aws.down(session, args.stack, keep_tokens=args.keep_tokens)
        print(f"stack {args.stack}: deleted" + (f"; its artefacts stay in s3://{bucket}" if bucket else ""))
        return 0
    if args.aws_command == "site-up":
        outs = aws.site_up(session, args.stack, args.site, parameters=dict(args.params), wait=not args.no_wait)
        name = aws.site_stack_name(args.stack, args.site)
        if not outs:
            print(f"stack {name}: creating; `fedfleet aws status --stack {args.stack}` lists its sites")
            return 0
        for key, value in sorted(outs.items()):
            print(f"{key:<22} {value}")
        print(f"the site's files: aws s3 sync DIR {outs['SiteDataUri']} (the worker copies them before it starts)")
        return 0
    if args.aws_command == "site-down":
        aws.site_down(session, args.stack, args.site)
        print(f"site {args.site} of stack {args.stack}: deleted; its files stay in the bucket under sites/{args.site}/")
        return 0
    bucket = args.bucket or aws.bucket_of(session, args.stack)
    prefix = args.prefix if args.prefix is not None else f"runs/{args.run_dir.resolve().name}"
    uploaded = aws.sync(session, args.run_dir, bucket, prefix)
    print(f"{len(uploaded)} files, {sum(u.size for u in uploaded):,} bytes -> s3://{bucket}/{prefix.strip('/')}/")
    return 0

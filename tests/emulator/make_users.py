"""Creates IAM users in a running emulator, with the policies credgate ships, and
hands their keys to credgate: in an AWS credentials file, or in Secrets Manager.

Usage: make_users.py --ready READY_JSON --password PASSWORD [--account-policy]
                     (--credentials FILE | --secrets-manager PREFIX --identity FILE)
                     USER [USER ...]

READY_JSON is the emulator's ready line (endpoint and admin keys). Each USER
gets the console password PASSWORD and an access key, and:
- with --credentials, deploy/aws/managed-user-policy-profiles.json and a
  profile of its name in FILE (keys.source = "profiles");
- with --secrets-manager, deploy/aws/managed-user-policy.json (it may rotate
  its own key) and its key in the secret PREFIX<user>, and an IAM user
  `credgate` stands for credgate's own role: deploy/aws/credgate-role-policy.json,
  its key written to FILE as AWS_ACCESS_KEY_ID=... lines for the environment
  (keys.source = "secretsmanager").
The emulator evaluates those policies as IAM does (users' ARNs, secrets'
ARNs, ${aws:username}). --account-policy also sets an account password
policy (length 12, every character class, no reuse prevention), so that
GetPasswordPolicy shows real rules and credgate's pre-check runs. Used by
deploy/local/run.
"""

import argparse
import json
from pathlib import Path

import boto3

POLICIES = Path(__file__).resolve().parents[2] / "deploy" / "aws"


def client(ready: dict, service: str):
    return boto3.client(
        service,
        endpoint_url=ready["endpoint"],
        region_name=ready["region"],
        aws_access_key_id=ready["admin_access_key_id"],
        aws_secret_access_key=ready["admin_secret_access_key"],
    )


def user(iam, name: str, policy: str, password: str | None) -> dict:
    """An IAM user with the shipped `policy` and one access key."""
    iam.create_user(UserName=name)
    if password is not None:
        iam.create_login_profile(UserName=name, Password=password)
    iam.put_user_policy(UserName=name, PolicyName="credgate", PolicyDocument=(POLICIES / policy).read_text())
    return iam.create_access_key(UserName=name)["AccessKey"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--account-policy", action="store_true")
    parser.add_argument("--credentials", help="write the users' keys to this AWS credentials file")
    parser.add_argument("--secrets-manager", metavar="PREFIX", help="store each user's key as the secret PREFIX<user>")
    parser.add_argument("--identity", help="with --secrets-manager: write credgate's own key here")
    parser.add_argument("users", nargs="+")
    args = parser.parse_args()
    if bool(args.credentials) == bool(args.secrets_manager) or bool(args.secrets_manager) != bool(args.identity):
        parser.error("give --credentials FILE, or --secrets-manager PREFIX with --identity FILE")
    with open(args.ready, encoding="utf-8") as f:
        ready = json.loads(f.readline())
    iam = client(ready, "iam")
    if args.account_policy:
        iam.update_account_password_policy(
            MinimumPasswordLength=12,
            RequireSymbols=True,
            RequireNumbers=True,
            RequireUppercaseCharacters=True,
            RequireLowercaseCharacters=True,
            AllowUsersToChangePassword=True,
        )
    first, last = args.users[0], args.users[-1]
    span = first if first == last else f"{first} .. {last}"
    if args.credentials:
        profiles = []
        for name in args.users:
            key = user(iam, name, "managed-user-policy-profiles.json", args.password)
            profiles.append(
                f"[{name}]\naws_access_key_id = {key['AccessKeyId']}\naws_secret_access_key = {key['SecretAccessKey']}\n"
            )
        Path(args.credentials).write_text("\n".join(profiles), encoding="utf-8")
        print(f"IAM users {span}: console password, access key and policy; keys in {args.credentials}")
        return
    secrets = client(ready, "secretsmanager")
    for name in args.users:
        key = user(iam, name, "managed-user-policy.json", args.password)
        secret = {"access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"]}
        secrets.create_secret(Name=f"{args.secrets_manager}{name}", SecretString=json.dumps(secret))
    own = user(iam, "credgate", "credgate-role-policy.json", None)
    Path(args.identity).write_text(
        f"AWS_ACCESS_KEY_ID={own['AccessKeyId']}\nAWS_SECRET_ACCESS_KEY={own['SecretAccessKey']}\n", encoding="utf-8"
    )
    Path(args.identity).chmod(0o600)
    print(
        f"IAM users {span}: console password, access key and policy; keys in the secrets "
        f"{args.secrets_manager}<user>; credgate's own identity (IAM user credgate) in {args.identity}"
    )


if __name__ == "__main__":
    main()

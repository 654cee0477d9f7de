"""Creates IAM users in a running emulator and writes their AWS credentials file.

Usage: make_users.py --ready READY_JSON --password PASSWORD --credentials FILE
                     [--account-policy] USER [USER ...]

READY_JSON is the emulator's ready line (endpoint and admin keys). Each USER
gets the console password PASSWORD, an access key in a profile of the same
name in FILE, and a policy allowing what credgate needs (ChangePassword,
GetAccountPasswordPolicy, GetUser). --account-policy also sets an account
password policy (length 12, every character class, no reuse prevention), so
credgate's pre-check really runs. Used by deploy/local/run.
"""

import argparse
import json

import boto3

SELF_SERVICE = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["iam:ChangePassword", "iam:GetAccountPasswordPolicy", "iam:GetUser"],
                # moto only matches Resource "*" (README.md beside this file).
                "Resource": "*",
            }
        ],
    }
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--credentials", required=True)
    parser.add_argument("--account-policy", action="store_true")
    parser.add_argument("users", nargs="+")
    args = parser.parse_args()
    with open(args.ready, encoding="utf-8") as f:
        ready = json.loads(f.readline())
    iam = boto3.client(
        "iam",
        endpoint_url=ready["endpoint"],
        region_name=ready["region"],
        aws_access_key_id=ready["admin_access_key_id"],
        aws_secret_access_key=ready["admin_secret_access_key"],
    )
    if args.account_policy:
        iam.update_account_password_policy(
            MinimumPasswordLength=12,
            RequireSymbols=True,
            RequireNumbers=True,
            RequireUppercaseCharacters=True,
            RequireLowercaseCharacters=True,
            AllowUsersToChangePassword=True,
        )
    profiles = []
    for user in args.users:
        iam.create_user(UserName=user)
        iam.create_login_profile(UserName=user, Password=args.password)
        iam.put_user_policy(UserName=user, PolicyName="credgate-self-service", PolicyDocument=SELF_SERVICE)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        profiles.append(
            f"[{user}]\naws_access_key_id = {key['AccessKeyId']}\naws_secret_access_key = {key['SecretAccessKey']}\n"
        )
    with open(args.credentials, "w", encoding="utf-8") as f:
        f.write("\n".join(profiles))
    first, last = args.users[0], args.users[-1]
    span = first if first == last else f"{first} .. {last}"
    print(f"IAM users {span}: console password, access key and policy; keys in {args.credentials}")


if __name__ == "__main__":
    main()

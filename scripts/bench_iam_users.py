"""Creates the IAM users for scripts/bench in the emulator and writes their keys.

Usage: bench_iam_users.py READY_JSON COUNT PREFIX PASSWORD CREDENTIALS_FILE

READY_JSON is the emulator's ready line (endpoint and admin keys). Users
PREFIX1..PREFIXCOUNT each get the console password PASSWORD, an access key in
profile of the same name in CREDENTIALS_FILE, and a policy allowing what both
credgate and the direct baseline need. One user per benchmark worker, so that
no two workers ever race on one password.

The account also gets a password policy (without reuse prevention, so the
benchmark can alternate between two passwords): credgate then really checks
each new password against a cached policy, as it would in production.
"""

import json
import sys

import boto3


def main() -> None:
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    ready_path, count, prefix, password, credentials_path = sys.argv[1:6]
    with open(ready_path, encoding="utf-8") as f:
        ready = json.loads(f.readline())
    iam = boto3.client(
        "iam",
        endpoint_url=ready["endpoint"],
        region_name=ready["region"],
        aws_access_key_id=ready["admin_access_key_id"],
        aws_secret_access_key=ready["admin_secret_access_key"],
    )
    iam.update_account_password_policy(
        MinimumPasswordLength=12,
        RequireSymbols=True,
        RequireNumbers=True,
        RequireUppercaseCharacters=True,
        RequireLowercaseCharacters=True,
        AllowUsersToChangePassword=True,
    )
    policy = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": ["iam:ChangePassword", "iam:GetAccountPasswordPolicy", "iam:GetUser"],
                    # moto only matches Resource "*" (tests/emulator/README.md).
                    "Resource": "*",
                }
            ],
        }
    )
    profiles = []
    for i in range(1, int(count) + 1):
        user = f"{prefix}{i}"
        iam.create_user(UserName=user)
        iam.create_login_profile(UserName=user, Password=password)
        iam.put_user_policy(UserName=user, PolicyName="bench", PolicyDocument=policy)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        profiles.append(
            f"[{user}]\naws_access_key_id = {key['AccessKeyId']}\n"
            f"aws_secret_access_key = {key['SecretAccessKey']}\n"
        )
    with open(credentials_path, "w", encoding="utf-8") as f:
        f.write("\n".join(profiles))
    print(f"{count} IAM users {prefix}1..{prefix}{count}, keys in {credentials_path}")


if __name__ == "__main__":
    main()

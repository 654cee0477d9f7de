"""Creates the demo IAM user in the emulator and writes its AWS credentials file.

Usage: bootstrap_iam.py READY_JSON USER PASSWORD CREDENTIALS_FILE

READY_JSON is the emulator's ready line (endpoint and admin keys). The user gets
a console password, an access key and a policy allowing what credgate needs.
"""

import json
import sys

import boto3


def main() -> None:
    ready_path, user, password, credentials_path = sys.argv[1:5]
    with open(ready_path, encoding="utf-8") as f:
        ready = json.loads(f.readline())
    iam = boto3.client(
        "iam",
        endpoint_url=ready["endpoint"],
        region_name=ready["region"],
        aws_access_key_id=ready["admin_access_key_id"],
        aws_secret_access_key=ready["admin_secret_access_key"],
    )
    iam.create_user(UserName=user)
    iam.create_login_profile(UserName=user, Password=password)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["iam:ChangePassword", "iam:GetAccountPasswordPolicy", "iam:GetUser"],
                "Resource": "*",
            }
        ],
    }
    iam.put_user_policy(UserName=user, PolicyName="credgate-self-service", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    with open(credentials_path, "w", encoding="utf-8") as f:
        f.write(f"[{user}]\naws_access_key_id = {key['AccessKeyId']}\naws_secret_access_key = {key['SecretAccessKey']}\n")
    print(f"IAM user {user}: console password set, access key {key['AccessKeyId']} in {credentials_path}")


if __name__ == "__main__":
    main()

"""The bundled store: authenticated requests work, wrong keys are refused."""

import uuid

import pytest
from botocore.exceptions import ClientError

from appliance.store.client import s3_client


def test_store_accepts_its_credentials_and_keeps_data(store):
    client = store.client()
    key = f"t/{uuid.uuid4()}"
    client.put_object(Bucket=store.bucket, Key=key, Body=b"hello")
    assert client.get_object(Bucket=store.bucket, Key=key)["Body"].read() == b"hello"


@pytest.mark.parametrize("access,secret", [("right", "wrong"), ("unknown", "whatever")])
def test_store_refuses_wrong_credentials(store, access, secret):
    if access == "right":
        access = store.access_key
    client = s3_client(store.endpoint_url, access, secret, attempts=1)
    with pytest.raises(ClientError) as err:
        client.list_objects_v2(Bucket=store.bucket)
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_store_refuses_anonymous(store):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{store.endpoint_url}/{store.bucket}?list-type=2", timeout=5)
    assert err.value.code == 403

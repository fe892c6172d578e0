"""Presigned URLs name the bucket's regional endpoint: a new bucket outside us-east-1 answers the
global one with a 307 for up to a day, which breaks the signature and the browser's CORS."""

from __future__ import annotations

from urllib.parse import urlsplit

import boto3
import pytest

from functions.api.presigning import presigning_s3


@pytest.mark.parametrize("region", ["eu-west-1", "us-east-1", "ap-southeast-2"])
def test_urls_are_signed_for_the_regional_virtual_hosted_endpoint(region, monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    session = boto3.session.Session(region_name=region, aws_access_key_id="k", aws_secret_access_key="s")
    url = presigning_s3(session).generate_presigned_url("put_object", Params={"Bucket": "fusion-data-b", "Key": "a/b"},
                                                         ExpiresIn=60)
    parts = urlsplit(url)
    assert parts.netloc == f"fusion-data-b.s3.{region}.amazonaws.com" and parts.path == "/a/b"
    assert f"%2F{region}%2Fs3%2Faws4_request" in parts.query  # SigV4, scoped to the bucket's region


def test_an_endpoint_set_for_the_process_is_kept(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5000")
    session = boto3.session.Session(region_name="eu-west-1", aws_access_key_id="k", aws_secret_access_key="s")
    url = presigning_s3(session).generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k"})
    assert url.startswith("http://127.0.0.1:5000/b/k?")


def test_a_published_folder_model_has_no_archive_to_download(aws, api):
    """fusion-publish registers a Hugging Face folder (artifact_uri ends with /): no key to sign."""
    from shared.store import PUBLIC_OWNER, Catalog

    Catalog(session=aws.session).register({
        "model_id": "hf-folder", "owner": PUBLIC_OWNER, "name": "folder", "kind": "base", "status": "ready",
        "artifact_uri": f"s3://{aws.env['ARTIFACTS_BUCKET']}/base-models/folder/", "created_at": "t"})
    assert api("GET", "/models/hf-folder")[0] == 200
    status, body = api("GET", "/models/hf-folder/download")
    assert status == 422 and body["error"]["details"][0]["field"] == "model_id", body
    assert "published Hugging Face folder" in body["error"]["message"]
    status, body = api("GET", "/models/base-debug/download")  # an archive (the aws fixture publishes it): signed as before
    assert status == 200 and "/base-models/debug/model.tar.gz?" in body["url"]

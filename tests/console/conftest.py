"""The console in a real browser: the system's headless Chromium, driven by Playwright, against
one local stack per module (the `debug` base model, few steps)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import requests

from local.demo import build_dataset
from local.stack import LocalStack

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "build" / "console-screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from local.sam import transformed

    # The roles check reads the template after the SAM transform, made once per process (seconds on
    # a busy machine): made here, not inside the first page's wait for the API.
    transformed()
    with LocalStack(base_sizes=("debug",), runs_dir=tmp_path_factory.mktemp("runs"), stop_grace_seconds=10) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A persistent context on a fresh user-data-dir (Chromium's own profile, nothing shared)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport=DESKTOP)
        context.set_default_timeout(20_000)
        yield context
        context.close()


class Tab:
    """A page whose browser-console errors fail the test, unless the test said it causes them."""

    def __init__(self, page, stack):
        self.page, self.stack = page, stack
        self.errors: list[str] = []
        self.allowed: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def open(self, route: str = "#/models") -> None:
        self.page.goto(f"{self.stack.console_url}{route}")

    def allow(self, pattern: str) -> None:
        self.allowed.append(pattern)

    def shot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(re.search(p, e) for p in self.allowed)]


@pytest.fixture
def tab(browser, stack):
    page = browser.new_page()
    page.set_viewport_size(DESKTOP)
    opened = Tab(page, stack)
    yield opened
    page.close()
    assert not opened.unexpected_errors(), opened.errors


# ---- the API, for what a test needs to exist before it opens a page ---------------------------

def call(stack, method: str, path: str, body=None, **kwargs):
    response = requests.request(method, f"{stack.api_url}{path}", json=body, timeout=30, **kwargs)
    assert response.status_code < 300, response.text
    return response.json()


def wait_job(stack, job_id: str, statuses=("completed", "failed", "cancelled"), timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = call(stack, "GET", f"/jobs/{job_id}")
        if job["status"] in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("data") / "stdlib.jsonl", 150_000)


@pytest.fixture(scope="module")
def dataset_id(stack, dataset_file) -> str:
    created = call(stack, "POST", "/datasets", {"name": "stdlib", "format": "jsonl"})
    requests.put(created["upload_url"], data=dataset_file.read_bytes(), timeout=30).raise_for_status()
    deadline = time.monotonic() + 30
    while (shown := call(stack, "GET", f"/datasets/{created['dataset_id']}"))["status"] == "pending":
        assert time.monotonic() < deadline, shown
        time.sleep(0.2)
    assert shown["status"] == "ready", shown
    return shown["dataset_id"]


def train_request(dataset: str, **hyper) -> dict:
    settings = {"train_steps": 20, "cycles": 2, "seq_len": 64, "lr": 1e-3, **hyper}
    return {"type": "train", "model": "base-debug", "dataset": dataset, "hyperparams": settings}


@pytest.fixture(scope="module")
def trained(stack, dataset_id) -> dict:
    """A model of the tenant's own: base-debug grown and trained for a few steps."""
    job = call(stack, "POST", "/jobs", train_request(dataset_id, output_name="console-trained"))
    job = wait_job(stack, job["job_id"])
    assert job["status"] == "completed", job
    return call(stack, "GET", f"/models/{job['output_model_id']}")

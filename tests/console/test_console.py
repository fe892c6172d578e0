"""What a person does in the Fusion Training Console, in headless Chromium against the local stack."""

from __future__ import annotations

import json
import re
import time

import pytest
from playwright.sync_api import expect

from tests.console.conftest import PHONE, call, train_request, wait_job

pytestmark = pytest.mark.slow

UNPROCESSABLE = r"status of 422"  # the browser logs each refused request; these tests cause some on purpose


def test_catalog_shows_lineage_and_the_model_page_compares_with_the_parent(tab, stack, trained):
    tab.open("#/models")
    page = tab.page
    row = page.locator(f'tr[data-model="{trained["model_id"]}"]')
    expect(row).to_contain_text("trained")
    expect(row).to_contain_text("base-debug")  # its parent, and its family
    expect(row).to_contain_text(re.compile(r"\d+\.\d\dK params|\d+\.\d\dM params"))
    expect(row).to_contain_text(trained["job_id"])
    expect(page.locator(".tree")).to_contain_text(f"{trained['model_id']} via job {trained['job_id']}")
    expect(page.locator('tr[data-model="base-debug"]')).to_contain_text("base")
    tab.shot("catalog")

    row.get_by_role("link", name=trained["model_id"]).click()
    expect(page.locator("h1")).to_have_text("console-trained")
    metrics = page.get_by_role("table", name="Metrics")
    expect(metrics).to_contain_text("base-debug (parent)")
    expect(metrics.locator('[data-key="perplexity"]')).to_have_text(f"{trained['perplexity']:.2f}")
    expect(page.get_by_role("link", name="Train from this model")).to_have_attribute(
        "href", f"#/jobs/new?model={trained['model_id']}")
    expect(page.get_by_role("link", name="Contract this model")).to_be_visible()
    expect(page.locator("dd", has_text=trained["artifact_uri"])).to_be_visible()  # or its download button
    tab.shot("model")
    # A model a job made is its files (uploaded uncompressed): a presigned link for each, named by its path.
    page.get_by_role("button", name="Download", exact=True).click()
    files = page.get_by_test_id("model-files")
    expect(files).to_contain_text("hf/config.json")
    expect(files.get_by_role("link", name="config.json", exact=True)).to_have_attribute(
        "href", re.compile(r"/output/model/config\.json\?.*X-Amz-Signature"))
    page.get_by_role("button", name="Close").click()
    expect(files).to_have_count(0)


def test_new_job_form_estimates_live_shows_field_errors_and_submits_once(tab, stack, dataset_id):
    tab.allow(UNPROCESSABLE)
    tab.open(f"#/jobs/new?model=base-debug&dataset={dataset_id}")
    page = tab.page
    estimate = page.get_by_test_id("estimate")
    expect(estimate.locator('[data-key="tokens"]')).to_contain_text("1 turns × 6 cycles × 1,000 steps_per_cycle × 256 seq_len = 1,536,000 tokens")
    expect(estimate.locator('[data-key="tokens"]')).to_contain_text("1.54M tokens")
    advanced = page.locator("details.advanced")
    expect(advanced).not_to_have_attribute("open", "")
    turns_hint = page.locator("#f-turns-hint")
    expect(turns_hint).to_contain_text("default 1 · range 1–10")
    expect(turns_hint).to_contain_text("2 recommended")

    page.get_by_label("turns").fill("2")
    expect(estimate.locator('[data-key="tokens"]')).to_contain_text("2 turns × 6 cycles")
    page.locator("details.advanced summary").click()
    expect(page.locator("#f-steps_per_cycle-hint")).to_contain_text("default 1000")
    expect(page.locator("#f-steps_per_cycle-hint")).to_contain_text("below 500 under-trains")
    expect(page.locator("#f-seq_len")).to_have_attribute("max", "512")  # the base model's context length
    expect(page.locator("#f-seq_len-hint")).to_contain_text(
        "range 16–512 (the context length of base-debug; the API's most is 8,192)")  # both bounds the API checks
    page.get_by_label("steps_per_cycle").fill("100")
    expect(page.get_by_role("list", name="Warnings")).to_contain_text("under-trains")

    page.get_by_label("seq_len").fill("4096")
    expect(page.locator("#f-seq_len-error")).to_contain_text("exceeds the context length 512")
    expect(page.locator("#f-seq_len")).to_have_attribute("aria-invalid", "true")
    page.get_by_label("seq_len").fill("64")
    page.get_by_label("train_steps").fill("20")
    expect(page.locator("#f-seq_len-error")).to_be_empty()
    tokens = estimate.locator('[data-key="tokens"]')
    expect(tokens).to_contain_text("2 turns × 20 train_steps × 64 seq_len = 2,560 tokens")
    for key in ("tier", "training_cost", "growth_fee", "total", "eta", "budget"):
        expect(estimate.locator(f'[data-key="{key}"]')).not_to_be_empty()
    expect(estimate.locator('[data-key="total"]')).to_contain_text("$")
    expect(estimate.locator('[data-key="budget"]')).to_contain_text(re.compile(r"\$[\d.]+ of \$100"))
    expect(estimate.locator('[data-key="growth_fee"]')).to_contain_text("params added")
    page.locator("#f-train_steps").blur()
    page.evaluate("window.scrollTo(0, 0)")
    tab.shot("new-job")

    before = len(call(stack, "GET", "/jobs")["jobs"])
    posts = []
    page.on("request", lambda r: posts.append(r.headers.get("idempotency-key"))
            if r.method == "POST" and r.url.endswith("/jobs") else None)
    page.get_by_role("button", name="Start training").dblclick()
    expect(page).to_have_url(re.compile(r"#/jobs/[a-z0-9-]+$"))
    job_id = page.url.rsplit("/", 1)[-1]
    time.sleep(1)  # a second job, had the double click made one, would be stored by now
    jobs = call(stack, "GET", "/jobs")["jobs"]
    assert len(jobs) == before + 1 and jobs[0]["job_id"] == job_id
    assert jobs[0]["settings"]["turns"] == 2 and jobs[0]["settings"]["train_steps"] == 20
    assert posts and all(posts), posts  # every submission carried an Idempotency-Key
    call(stack, "POST", f"/jobs/{job_id}/cancel")  # spare the CPU: the run itself is tested below


def test_a_submission_whose_answer_was_lost_is_retried_into_the_same_job(tab, stack, dataset_id):
    tab.allow(r"ERR_FAILED|ERR_CONNECTION|Failed to load resource")
    tab.open(f"#/jobs/new?model=base-debug&dataset={dataset_id}")
    page = tab.page
    page.locator("details.advanced summary").click()
    page.get_by_label("train_steps").fill("20")
    page.get_by_label("seq_len").fill("64")
    expect(page.get_by_test_id("estimate").locator('[data-key="tokens"]')).to_contain_text("= 1,280 tokens")
    keys = []

    def lose_the_answer(route):
        keys.append(route.request.headers["idempotency-key"])
        route.fetch()  # the API creates the job ...
        route.abort("connectionreset")  # ... and the answer never arrives

    page.route("**/jobs", lose_the_answer, times=1)
    before = len(call(stack, "GET", "/jobs")["jobs"])
    page.get_by_role("button", name="Start training").click()
    expect(page.locator("#banner")).to_contain_text("cannot be reached")
    assert len(call(stack, "GET", "/jobs")["jobs"]) == before + 1
    page.get_by_role("button", name="Start training").click()  # the person tries again
    expect(page).to_have_url(re.compile(r"#/jobs/[a-z0-9-]+$"))
    jobs = call(stack, "GET", "/jobs")["jobs"]
    assert len(jobs) == before + 1 and page.url.endswith(jobs[0]["job_id"]) and len(keys) == 1
    call(stack, "POST", f"/jobs/{jobs[0]['job_id']}/cancel")


def test_job_page_charts_the_curve_as_it_grows_then_shows_the_bill(tab, stack, dataset_id):
    # Long enough for several of the page's polls (console/app.js POLL_MS) on a fast CPU: 60 steps
    # ran in 4.4 s in fp32, two polls, and the chart was seen empty and then whole.
    job = call(stack, "POST", "/jobs", train_request(dataset_id, train_steps=240, cycles=3))
    tab.open(f"#/jobs/{job['job_id']}")
    page = tab.page
    expect(page.locator(".status")).to_contain_text("train of base-debug")
    loss = page.locator("svg.chart.loss")
    seen = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        points = int(loss.get_attribute("data-points") or 0)
        if not seen or points != seen[-1]:
            seen.append(points)
        if page.locator(".status .badge").get_attribute("data-status") == "completed":
            break
        time.sleep(0.3)
    assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] >= 6, seen  # it grew while the job ran
    perplexity = page.locator("svg.chart.perplexity")
    expect(perplexity).to_have_attribute("data-points", "3")  # one held-out evaluation per cycle
    expect(page.locator('[data-key="bill"]')).to_contain_text("$")
    expect(page.locator(".progress-line")).to_contain_text("Ended completed")
    expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()
    tab.shot("job-chart")


def test_cancel_says_what_will_be_billed_then_stops_the_job(tab, stack, dataset_id):
    job = call(stack, "POST", "/jobs", train_request(dataset_id, train_steps=5000, cycles=1))
    tab.open(f"#/jobs/{job['job_id']}")
    page = tab.page
    expect(page.locator(".progress-line")).to_contain_text("step", timeout=60_000)
    expect(page.locator(".status .badge")).to_have_attribute("data-status", "running")
    page.get_by_role("button", name="Cancel job").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_test_id("cancel-billing")).to_contain_text("billed for the tokens it trained so far")
    expect(dialog.get_by_test_id("cancel-billing")).to_contain_text("$")
    tab.shot("cancel")
    dialog.get_by_role("button", name="Cancel the job").click()
    expect(page.locator(".status .badge")).to_have_attribute("data-status", "cancelled", timeout=60_000)
    expect(page.locator('[data-key="bill"]')).to_contain_text("$")


def test_a_failed_job_shows_its_reason(tab, stack, dataset_id):
    job = call(stack, "POST", "/jobs", train_request(dataset_id, lr=1.0, train_steps=40, cycles=1))
    done = wait_job(stack, job["job_id"])
    tab.open(f"#/jobs/{job['job_id']}")
    if done["status"] == "failed":
        expect(tab.page.locator('[data-key="failure"]')).to_contain_text(done["failure_reason"][:40])
    else:  # lr=1.0 did not diverge this time: no reason to show, and none shown
        expect(tab.page.locator('[data-key="failure"]')).to_have_count(0)


def test_contract_from_the_model_page_shows_before_and_after(tab, stack, trained):
    tab.open(f"#/models/{trained['model_id']}")
    page = tab.page
    page.get_by_role("link", name="Contract this model").click()
    slider = page.get_by_label("contraction_ratio")
    expect(slider).to_have_attribute("min", "0.1")
    expect(slider).to_have_attribute("max", "0.9")
    expect(slider).to_have_value("0.5")
    for value, name in (("0.25", "conservative"), ("0.5", "balanced"), ("0.75", "aggressive")):
        expect(page.locator(f'#ratio-marks option[value="{value}"]')).to_have_attribute("label", name)
    layers = page.get_by_label("num_layers_to_contract")
    expect(layers).to_have_attribute("max", str(trained["depth"]))
    expect(page.locator("#f-num_layers_to_contract-hint")).to_contain_text(f"range 1–{trained['depth']}")
    slider.focus()
    page.keyboard.press("ArrowRight")  # the keyboard moves the slider by its step
    expect(page.locator("#ratio-value")).to_have_text("0.55")
    layers.fill("2")
    estimate = page.get_by_test_id("estimate")
    expect(estimate.locator('[data-key="total"]')).to_contain_text("$")
    expect(estimate.locator('[data-key="tier"]')).to_contain_text("params")
    tab.shot("contract")
    page.get_by_role("button", name="Contract").click()
    expect(page).to_have_url(re.compile(r"#/jobs/[a-z0-9-]+$"))
    result = page.get_by_role("table", name="Before and after")
    expect(result).to_be_visible(timeout=240_000)
    after = call(stack, "GET", f"/models/{call(stack, 'GET', '/jobs/' + page.url.rsplit('/', 1)[-1])['output_model_id']}")
    expect(result).to_contain_text(trained["model_id"])
    expect(result.locator('[data-key="after-perplexity"]')).to_have_text(f"{after['perplexity']:.2f}")
    # the parent as the contract job measured it, on the child's windows, and those windows named
    expect(result).to_contain_text(f"{after['parent_perplexity']:.2f}")
    expect(page.locator("main")).to_contain_text(f"Both perplexities on {after['perplexity_on']['windows']} "
                                                 "held-out windows of 256 tokens")
    assert after["parameters"] < trained["parameters"]
    tab.shot("contract-result")


def test_an_evaluation_shows_the_models_side_by_side_on_the_same_windows(tab, stack, dataset_id, trained):
    """An evaluate job through the whole local stack (the container measures both models), then its page."""
    job = call(stack, "POST", "/jobs", {"type": "evaluate", "dataset": dataset_id, "hyperparams": {
        "model_ids": [trained["model_id"], "base-debug"], "seq_len": 64, "max_windows": 8}})
    job = wait_job(stack, job["job_id"])
    assert job["status"] == "completed", job
    rows = job["evaluation"]["rows"]
    assert [r["model_id"] for r in rows] == [trained["model_id"], "base-debug"]
    assert rows[0]["perplexity_on"] == rows[1]["perplexity_on"] and rows[0]["perplexity_on"]["seq_len"] == 64
    assert rows[0]["perplexity_on"]["dataset"] == dataset_id and len(rows[0]["perplexity_on"]["sha256"]) == 64
    assert rows[0]["perplexity"] < rows[1]["perplexity"]  # trained on this data, against the untrained base
    tab.open(f"#/jobs/{job['job_id']}")
    page = tab.page
    table = page.get_by_role("table", name="Evaluation")
    for row in rows:
        expect(table.locator(f'tr[data-model="{row["model_id"]}"] [data-key="perplexity"]')).to_have_text(
            f"{row['perplexity']:.2f}")
    expect(page.locator("main")).to_contain_text(
        f"on the same {rows[0]['perplexity_on']['windows']} held-out windows of 64 tokens of {dataset_id}")
    tab.shot("evaluation")


def test_jobs_list_filters_by_status_and_updates_live(tab, stack, dataset_id):
    tab.open("#/jobs?status=cancelled")
    page = tab.page
    expect(page.get_by_role("link", name="cancelled")).to_have_attribute("aria-current", "true")
    job = call(stack, "POST", "/jobs", train_request(dataset_id))
    call(stack, "POST", f"/jobs/{job['job_id']}/cancel")
    row = page.locator(f'tr[data-job="{job["job_id"]}"]')
    expect(row).to_contain_text("cancelled", timeout=15_000)  # appeared without a reload (idle lists poll every 10 s)
    for status in page.locator("tbody .badge").all_inner_texts():
        assert status == "cancelled"
    page.get_by_role("link", name="completed").click()
    expect(row).to_have_count(0)
    for status in page.locator("tbody .badge").all_inner_texts():
        assert status == "completed"
    tab.shot("jobs")


def test_datasets_upload_with_progress_then_ready_or_rejected(tab, stack, dataset_file, tmp_path):
    tab.open("#/datasets")
    page = tab.page
    page.get_by_label("Drop a file here, or choose one").set_input_files(str(dataset_file))
    expect(page.get_by_label("Name")).to_have_value("stdlib")
    page.get_by_role("button", name="Upload").click()
    expect(page.get_by_label("Upload progress")).to_have_attribute("value", "100")
    ready = page.locator('.upload-state [data-status="ready"]')
    expect(ready).to_contain_text(re.compile(r"Ready: stdlib, [\d.]+K tokens"))
    expect(ready.get_by_role("link", name="Train on it")).to_be_visible()
    tab.shot("datasets")

    page.get_by_label("Name").fill("broken")
    page.evaluate("""(text) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([text], "broken.jsonl", {type: "text/plain"}));
        document.querySelector('[data-testid="drop"]').dispatchEvent(
            new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", "this is not JSON\n" * 50)
    page.get_by_role("button", name="Upload").click()
    rejected = page.locator('.upload-state [data-status="rejected"]')
    expect(rejected).to_contain_text("Rejected: ")
    reason = [d for d in call(stack, "GET", "/datasets")["datasets"] if d["name"] == "broken"][0]["reason"]
    expect(rejected).to_contain_text(reason)
    expect(page.get_by_role("table", name="Datasets")).to_contain_text(reason)


def _models_fail(page) -> None:
    """GET /models answers the API's 500 until page.unroute("**/models")."""
    page.route("**/models", lambda route: route.fulfill(
        status=500, content_type="application/json",
        body='{"error": {"code": "internal_error", "message": "the request failed on our side; it is safe to retry", "details": []}}'))


def test_an_api_failure_or_outage_is_a_message_never_a_blank_page(tab, stack):
    tab.allow(r"status of 500|ERR_FAILED|Failed to load resource|ERR_CONNECTION")
    page = tab.page
    _models_fail(page)
    tab.open("#/models")
    expect(page.get_by_role("alert").first).to_contain_text("failed on our side")
    expect(page.locator("h1")).to_have_text("Something went wrong")
    page.unroute("**/models")
    page.route("**/jobs", lambda route: route.abort("connectionrefused"))
    page.goto(f"{stack.console_url}#/jobs")
    expect(page.locator("#banner")).to_contain_text("cannot be reached")
    tab.shot("api-down")


def test_keyboard_labels_and_a_phone_screen(tab, stack, dataset_id):
    tab.open(f"#/jobs/new?model=base-debug&dataset={dataset_id}")
    page = tab.page
    expect(page.get_by_test_id("estimate")).to_be_visible()
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter((e) => e.type !== 'hidden' && !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
        .map((e) => e.name || e.id)""")
    assert unlabelled == []
    page.locator("details.advanced summary").focus()
    page.keyboard.press("Enter")
    expect(page.locator("details.advanced")).to_have_attribute("open", "")
    page.locator("header nav a", has_text="Jobs").focus()
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"#/jobs$"))

    page.set_viewport_size(PHONE)
    for name, route, title in (("new-job", f"#/jobs/new?model=base-debug&dataset={dataset_id}", "New train job"),
                               ("models", "#/models", "Models"), ("datasets", "#/datasets", "Datasets")):
        page.goto(f"{stack.console_url}{route}")
        expect(page.locator("h1")).to_have_text(title)
        page.wait_for_load_state("networkidle")
        overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{route} scrolls sideways by {overflow}px on a phone"
        tab.shot(f"phone-{name}")


class _IdentityProvider:
    """An OAuth 2.0 authorization server of the least kind: it signs everyone in, and hands out a
    token only for the code it issued and a verifier that hashes to that code's PKCE challenge."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        provider = self
        self.exchanges: list[dict] = []
        self.codes: dict[str, dict] = {}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                from urllib.parse import parse_qs, urlencode, urlsplit

                query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
                code = f"code-{len(provider.codes)}"
                provider.codes[code] = query
                self.send_response(302)
                self.send_header("location", f"{query['redirect_uri']}?{urlencode({'code': code, 'state': query['state']})}")
                self.end_headers()

            def do_POST(self):
                import base64
                import hashlib
                import json
                from urllib.parse import parse_qs

                from tests.conftest import unsigned_jwt

                form = {k: v[0] for k, v in parse_qs(self.rfile.read(int(self.headers["content-length"])).decode()).items()}
                asked = provider.codes.pop(form.get("code"), None)
                digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
                challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
                good = (asked is not None and asked["code_challenge_method"] == "S256" and asked["code_challenge"] == challenge
                        and form["redirect_uri"] == asked["redirect_uri"] and form["client_id"] == asked["client_id"] == "console"
                        and form["grant_type"] == "authorization_code")
                provider.exchanges.append({"good": good, **form})
                body = json.dumps({"access_token": unsigned_jwt({"sub": "pkce-user"}), "token_type": "Bearer"} if good
                                  else {"error": "invalid_grant"}).encode()
                self.send_response(200 if good else 400)
                self.send_header("content-type", "application/json")
                self.send_header("access-control-allow-origin", "*")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_deployed_the_console_signs_in_with_the_authorization_code_and_pkce(tab, stack, monkeypatch):
    provider = _IdentityProvider()
    try:
        monkeypatch.setenv("FUSION_CONSOLE_CLIENT_ID", "console")
        monkeypatch.setenv("FUSION_CONSOLE_ISSUER", provider.url)
        monkeypatch.setenv("FUSION_CONSOLE_AUTHORIZE_URL", f"{provider.url}/authorize")
        monkeypatch.setenv("FUSION_CONSOLE_TOKEN_URL", f"{provider.url}/token")
        page = tab.page
        sent = []
        page.on("request", lambda r: sent.append(r.headers.get("authorization")) if r.url.startswith(f"{stack.api_url}/jobs") else None)
        tab.open("#/jobs")
        expect(page.get_by_role("button", name="Sign out")).to_be_visible()
        expect(page).to_have_url(f"{stack.console_url}#/jobs")  # the code and state are gone from the address
        expect(page.locator(".empty")).to_contain_text("No jobs yet")  # pkce-user's jobs: none
        assert [e["good"] for e in provider.exchanges] == [True]
        assert sent and all(s and s.startswith("Bearer ") for s in sent), sent
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("button", name="Sign out")).to_be_visible()  # signed out, then straight back in
        assert [e["good"] for e in provider.exchanges] == [True, True]
    finally:
        provider.close()


def test_the_landing_leads_upload_train_contract_in_the_menu_order(tab, stack):
    tab.open("#/")
    page = tab.page
    expect(page.locator("h1")).to_have_text("Train your own language model")
    steps = page.get_by_role("list", name="Getting started").locator("li")
    expect(steps).to_have_count(3)
    expect(steps.nth(0)).to_contain_text("1. Upload a dataset")
    expect(steps.nth(1)).to_contain_text("2. Train a model")
    expect(steps.nth(2)).to_contain_text("3. Contract it")
    assert page.locator("header nav a").all_inner_texts() == ["1. Datasets", "2. Train", "Jobs", "Models", "Tune"]
    tab.shot("home")
    page.emulate_media(color_scheme="dark")
    background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    channels = [int(x) for x in re.findall(r"\d+", background)[:3]]
    assert max(channels) < 60, background  # dark mode follows the system's setting
    tab.shot("home-dark")
    page.emulate_media(color_scheme="light")


def test_the_form_speaks_words_and_its_estimate_stays_in_view(tab, stack, dataset_id):
    tab.open(f"#/jobs/new?model=base-debug&dataset={dataset_id}")
    page = tab.page
    expect(page.locator('label[for="f-turns"]')).to_have_text("Turns turns")
    expect(page.locator("#f-turns")).to_have_attribute("placeholder", "default 1")
    estimate = page.get_by_test_id("estimate")
    expect(estimate.locator('[data-key="trained_tokens"]')).to_contain_text("each step trains on 8 sequences")
    expect(estimate.locator('[data-key="minimum_charge"]')).to_contain_text("the least any job pays")
    expect(estimate.locator('[data-key="eta"]')).to_contain_text("of it starting the instance")
    page.locator("details.advanced summary").click()
    for size in (None, PHONE):
        if size:
            page.set_viewport_size(size)
        page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_timeout(200)
        box = page.locator("section.estimate").bounding_box()
        height = page.viewport_size["height"]
        assert box and box["y"] < height and box["y"] + min(box["height"], 80) > 0, (size, box)
        tab.shot("new-job-phone" if size else "new-job-scrolled")


def test_start_training_waits_for_a_ready_dataset(tab, stack):
    page = tab.page
    page.route("**/datasets", lambda route: route.fulfill(status=200, content_type="application/json",
                                                          body='{"datasets": []}'))
    tab.open("#/jobs/new?model=base-debug")
    expect(page.get_by_role("button", name="Start training")).to_be_disabled()
    expect(page.get_by_role("link", name="Upload one")).to_be_visible()
    page.unroute("**/datasets")


def test_deleting_a_parent_keeps_it_in_its_childs_lineage(tab, stack):
    from shared.store import Catalog

    catalog = Catalog(session=stack._session)
    on = {"source": "split", "dataset": "ds-x", "windows": 8, "seq_len": 64, "tokens": "all"}
    for model_id, parent, parameters, perplexity, digest in (("m-console-parent", "base-debug", 1000, 20.0, "ab"),
                                                             ("m-console-child", "m-console-parent", 790, 21.0, "ab"),
                                                             ("m-console-other", "m-console-parent", 790, 21.0, "cd")):
        catalog.register({"model_id": model_id, "owner": "local", "name": model_id, "kind": "trained",
                          "parent_id": parent, "job_id": None, "parameters": parameters, "perplexity": perplexity,
                          "perplexity_on": {**on, "sha256": digest * 32}, "created_at": "2026-01-02T00:00:00.000Z"})
    tab.open("#/models/m-console-child")
    page = tab.page
    expect(page.locator('[data-change="parameters"]')).to_have_text("-21.0%")
    expect(page.locator('[data-change="perplexity"]')).to_have_text("+5.0%")
    tab.open("#/models/m-console-other")  # measured on other windows: no change is claimed
    expect(page.locator('[data-change="perplexity"]')).to_have_text("other windows")
    tab.open("#/models/m-console-parent")
    expect(page.get_by_role("list", name="Children")).to_contain_text("m-console-child")
    page.get_by_role("button", name="Delete model").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete the model").click()
    expect(page).to_have_url(re.compile(r"#/models$"))
    expect(page.locator('tr[data-model="m-console-parent"]')).to_have_count(0)
    tab.open("#/models/m-console-child")
    expect(page.locator('[data-parent="deleted"]')).to_have_text(" (deleted)")


def test_a_page_recovers_by_itself_after_an_outage(tab, stack):
    tab.allow(r"status of 500|Failed to load resource")
    page = tab.page
    _models_fail(page)
    tab.open("#/models")
    expect(page.locator("h1")).to_have_text("Something went wrong")
    expect(page.get_by_role("button", name="Retry")).to_be_visible()
    page.unroute("**/models")
    expect(page.locator("h1")).to_have_text("Models", timeout=12_000)  # no click


def test_the_playground_answers_a_prompt_and_a_conversation_with_their_latency(tab, stack, trained):
    """The local stack answers as the model's endpoint would (greedy here: the text is the API's)."""
    model_id = trained["model_id"]
    expected = call(stack, "POST", f"/models/{model_id}/generate", {"prompt": "def ", "max_tokens": 4, "temperature": 0})
    tab.open(f"#/models/{model_id}")
    page = tab.page
    form = page.get_by_role("form", name="Try the model")
    expect(page.locator("#f-max_tokens")).to_have_attribute("max", "512")  # the API's own bound (OpenAPI)
    page.get_by_label("Prompt").fill("def ")
    page.locator("#f-max_tokens").fill("4")
    page.locator("#f-temperature").fill("0")
    form.get_by_role("button", name="Generate").click()
    expect(page.get_by_test_id("latency")).to_contain_text(re.compile(r"Answered in [\d,]+ ms by fusion-"))
    expect(page.locator(".generated")).to_have_text("def " + expected["text"])
    tab.shot("playground")

    page.get_by_label("As a conversation (the model's chat template)").check()
    page.get_by_label("Prompt").fill("Hello")
    form.get_by_role("button", name="Generate").click()
    turns = page.get_by_role("list", name="Conversation").locator("li")
    expect(turns).to_have_count(2)
    expect(turns.nth(0)).to_have_attribute("data-role", "user")
    expect(turns.nth(1)).to_have_attribute("data-role", "assistant")
    expect(page.get_by_label("Prompt")).to_have_value("")  # ready for the next turn
    page.get_by_label("Prompt").fill("And then?")
    form.get_by_role("button", name="Generate").click()
    expect(turns).to_have_count(4)  # the conversation goes on
    page.get_by_role("button", name="New conversation").click()
    expect(turns).to_have_count(0)

    page.set_viewport_size(PHONE)
    page.reload()
    expect(page.get_by_role("form", name="Try the model")).to_be_visible()
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the model page scrolls sideways by {overflow}px on a phone"
    tab.shot("playground-phone")


def test_a_model_without_an_endpoint_says_how_to_deploy_it(tab, stack, trained):
    tab.allow(r"status of 409")
    page = tab.page
    refusal = {"error": {"code": "not_deployed", "message": f"{trained['model_id']} is not deployed: no endpoint of "
               "this stack serves it. Deploy it with `fusion models deploy X --instance-type ml.g5.xlarge`", "details": []}}
    page.route("**/generate", lambda route: route.fulfill(status=409, content_type="application/json",
                                                          body=json.dumps(refusal)))
    tab.open(f"#/models/{trained['model_id']}")
    page.get_by_label("Prompt").fill("Hi")
    page.get_by_role("form", name="Try the model").get_by_role("button", name="Generate").click()
    expect(page.locator('[data-code="not_deployed"]')).to_contain_text("is not deployed")
    expect(page.get_by_test_id("answer").locator("code")).to_have_text("fusion models deploy X --instance-type ml.g5.xlarge")
    expect(page.get_by_role("button", name="Copy fusion models deploy X --instance-type ml.g5.xlarge")).to_be_visible()


def test_the_contract_form_forecasts_the_size_as_the_slider_moves(tab, stack, trained):
    tab.open(f"#/models/{trained['model_id']}/contract")
    page = tab.page
    page.get_by_label("num_layers_to_contract").fill("2")
    forecast = page.get_by_test_id("estimate").locator('[data-key="contraction"]')
    expect(forecast).to_contain_text(f"depth {trained['depth']}")
    expect(forecast).to_contain_text("2 blocks:")
    size = forecast.locator('[data-key="after-parameters"]')
    quote = call(stack, "POST", "/jobs/estimate", {"type": "contract", "hyperparams": {
        "source_model_id": trained["model_id"], "num_layers_to_contract": 2, "contraction_ratio": 0.5}})
    expect(size).to_have_text(re.compile(r"\d+\.\d\d[KM] params"))
    before = size.inner_text()
    expect(forecast).to_contain_text(re.compile(r"\(-\d+\.\d%\)"))
    page.get_by_label("contraction_ratio").focus()
    for _ in range(5):
        page.keyboard.press("ArrowRight")  # 0.5 -> 0.75
    expect(page.locator("#ratio-value")).to_have_text("0.75")
    expect(size).not_to_have_text(before)  # a smaller model: the forecast follows the slider
    later = call(stack, "POST", "/jobs/estimate", {"type": "contract", "hyperparams": {
        "source_model_id": trained["model_id"], "num_layers_to_contract": 2, "contraction_ratio": 0.75}})
    assert later["estimate"]["contraction"]["parameters_min"] < quote["estimate"]["contraction"]["parameters_min"]
    tab.shot("contract-forecast")


def test_the_job_page_says_what_runs_and_where_a_cancelled_job_stopped(tab, stack, dataset_id):
    job = call(stack, "POST", "/jobs", {"type": "train", "model": "base-debug", "dataset": dataset_id,
                                        "hyperparams": {"train_steps": 4000, "seq_len": 64, "lr": 1e-3}})
    tab.open(f"#/jobs/{job['job_id']}")
    page = tab.page
    expect(page.locator('[data-key="schedule"]')).to_have_text("1 turn × 1 cycle × 4,000 steps")  # not cycles=6
    expect(page.locator('[data-setting="seq_len"]')).to_contain_text("Sequence length (tokens): 64")
    expect(page.locator(".progress-line")).to_contain_text("step", timeout=60_000)
    call(stack, "POST", f"/jobs/{job['job_id']}/cancel")
    ended = wait_job(stack, job["job_id"])
    assert ended["status"] == "cancelled" and ended["stopped"], ended
    step, total = ended["stopped"]["step"], ended["stopped"]["total_steps"]
    assert 0 < step < total == 4000
    expect(page.locator(".progress-line")).to_contain_text(f"Cancelled at step {step:,} of {total:,}")
    bar = page.get_by_label("Progress")
    expect(bar).to_have_attribute("value", str(step))
    expect(bar).to_have_attribute("max", str(total))
    tab.open(f"#/jobs/{job['job_id']}")  # opened afresh, it shows the same
    expect(page.locator(".progress-line")).to_contain_text(f"Cancelled at step {step:,} of {total:,}")


def test_the_catalog_lists_yours_first_and_says_when_it_scrolls_sideways(tab, stack, trained):
    tab.open("#/models")
    page = tab.page
    kinds_column = page.get_by_role("table", name="Catalog").locator("tbody td:nth-child(3)")
    expect(kinds_column.first).not_to_have_text("base")
    kinds = kinds_column.all_inner_texts()
    first_base = kinds.index("base")
    assert first_base > 0 and set(kinds[first_base:]) == {"base"}, kinds  # yours, then the base models
    box = page.locator(".scroll").first
    wide = page.evaluate("(box) => box.scrollWidth > box.clientWidth + 1", box.element_handle())
    cue = page.locator(".scroll-cue").first
    (expect(cue).to_be_visible() if wide else expect(cue).to_be_hidden())  # at 1280 px: a cue, or no overflow
    page.set_viewport_size(PHONE)
    expect(cue).to_be_visible()  # a phone is narrower than the catalog
    expect(box).to_have_attribute("data-more-right", "")
    box.evaluate("(box) => box.scrollTo(box.scrollWidth, 0)")
    expect(box).not_to_have_attribute("data-more-right", "")  # scrolled to the end: nothing more on the right

"""Screenshots of the Prefect UI for the docs: docs/img/prefect-*.png (headless Chromium, driven over CDP).

    .venv/bin/python scripts/ui_screenshots.py [OUT_DIR]       # default docs/img

Everything runs on 127.0.0.1 and is torn down on exit:
  1. `prefect server start` on a free port, its own PREFECT_HOME in a temp folder;
  2. through that server: `redi run` of a tiny recipe (registers it), then `redi stage evaluate` with
     `--set evaluate.n_samples=1` (upstream cache hits, evaluation built), then `redi nightly` twice;
  3. the served deployments registered (deployments/serve.py build_deployments), not run;
  4. Chromium opens each page, clicks the tab it needs and saves:
       prefect-run.png           the stage rerun's flow-run page: task graph (task names say
                                 "[cache hit]" / "[built N s]") and the Logs tab with the library's lines
       prefect-run-artifact.png  the same run, Artifacts tab
       prefect-run-dag.png       its DAG artifact: every node with status and seconds (evaluate[*] included)
       prefect-run-report.png    its report artifact: the metrics table and the bar chart
       prefect-stage-form.png    the run form of redi-stage/evaluate: recipe dropdown, overrides, refresh, ..., the
                                 evaluate section's own fields (empty = the recipe's value)
       prefect-nightly.png       the nightly history markdown artifact (table + dated plot)
Needs Debian's chromium (`apt-get install -y chromium`). Look at every image before committing it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = """run: {name: ui-demo, device: cpu, threads: 1, artifact_root: ART}
data: {source: synthetic, synth: {n_train: 60, traces_per_problem: 4, n_test: 10, n_val: 0}}
model: {base: tiny, tiny: {hidden_size: 32, num_layers: 2, num_heads: 1, num_kv_heads: 1, intermediate_size: 64, vocab_size: 300, tokenizer_samples: 200}}
verify: {decontaminate: false, workers: 1}
sft: {max_steps: 3, global_batch: 4, micro_batch: 4, max_length: 512, save_steps: 1}
redi: {max_steps: 2, global_batch: 4, micro_batch: 4, max_length: 512, save_steps: 1}
evaluate: {backend: hf, n_samples: 2, max_new_tokens: 32, benchmarks: [demo_test], max_problems: 5, grade_workers: 1}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_url(url: str, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def redi(*args: str, env: dict) -> None:
    subprocess.run([PY, "-m", "redi.cli", *args], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)


class Chrome:
    """A headless Chromium driven over the DevTools protocol (navigate, click a tab by its text, screenshot)."""

    def __init__(self, work: Path, width: int = 1400, height: int = 900):
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if not exe:
            sys.exit("chromium not found: apt-get install -y chromium")
        prof = work / "chrome"
        self.proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                      "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                                      f"--user-data-dir={prof}", "--remote-debugging-port=0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = prof / "DevToolsActivePort"
        for _ in range(100):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        from websockets.sync.client import connect

        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.n = 0
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expr: str):
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True).get("result", {}).get("value")

    def open(self, url: str, wait_s: float = 6) -> None:
        self.call("Page.navigate", url=url)
        time.sleep(wait_s)

    def click_text(self, text: str, wait_s: float = 4) -> None:
        found = self.js(f"""(() => {{ const el = [...document.querySelectorAll('button, [role=tab], a, li, span')]
            .find(e => e.textContent.trim() === {json.dumps(text)}); if (el) {{ el.click(); return true; }} return false; }})()""")
        if not found:
            raise RuntimeError(f"no element with text {text!r} on {self.js('location.href')}")
        time.sleep(wait_s)

    def shot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"  {path}")

    def close(self) -> None:
        self.ws.close()
        os.killpg(self.proc.pid, signal.SIGTERM)


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="redi-ui-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(work / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_API_URL=api, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    chrome = None
    try:
        wait_url(f"{api}/health")
        env["PREFECT_API_URL"] = api
        art = work / "artifacts"
        recipe = work / "recipe.yaml"
        recipe.write_text(TINY.replace("ART", str(art)))
        print("runs through the server ...")
        redi("run", str(recipe), env=env)
        redi("stage", "evaluate", str(recipe), "--set", "evaluate.n_samples=1", env=env)
        redi("nightly", "--artifact-root", str(art), env=env)
        redi("nightly", "--artifact-root", str(art), env=env)
        os.environ["PREFECT_API_URL"] = api
        ids = _register_and_find(art, api)
        chrome = Chrome(work)
        ui = f"http://127.0.0.1:{port}"
        print("screenshots:")
        chrome.open(f"{ui}/runs/flow-run/{ids['stage_run']}", wait_s=8)
        chrome.click_text("Logs")
        chrome.shot(out_dir / "prefect-run.png")
        chrome.click_text("Artifacts")
        chrome.shot(out_dir / "prefect-run-artifact.png")
        chrome.open(f"{ui}/artifacts/artifact/{ids['dag']}")
        chrome.shot(out_dir / "prefect-run-dag.png")
        chrome.open(f"{ui}/deployments/deployment/{ids['evaluate_deployment']}/run", wait_s=8)
        chrome.call("Emulation.setDeviceMetricsOverride", width=1400, height=1500, deviceScaleFactor=1, mobile=False)
        chrome.shot(out_dir / "prefect-stage-form.png")
        chrome.call("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
        chrome.open(f"{ui}/artifacts/artifact/{ids['nightly_md']}")
        chrome.shot(out_dir / "prefect-nightly.png")
        chrome.open(f"{ui}/artifacts/artifact/{ids['report']}")
        chrome.shot(out_dir / "prefect-run-report.png")
    finally:
        if chrome is not None:
            chrome.close()
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


def _register_and_find(art: Path, api: str) -> dict[str, str]:
    """Register the served deployments (not run) and look up the ids the pages need."""
    import runpy

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort

    for d in runpy.run_path(str(REPO / "deployments" / "serve.py"))["build_deployments"](str(art)):
        d.apply()
    with get_client(sync_client=True) as c:
        def latest_artifact(key: str) -> str:
            return str(c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                        sort=ArtifactSort.CREATED_DESC, limit=1)[0].id)

        stage_run = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["redi-stage"])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        return {"stage_run": str(stage_run.id), "dag": latest_artifact("ui-demo-dag"), "report": latest_artifact("ui-demo-report"),
                "nightly_md": latest_artifact("nightly-history-md"),
                "evaluate_deployment": str(c.read_deployment_by_name("redi-stage/evaluate").id)}


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "img")

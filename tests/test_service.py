"""The inspection service: API on tiny models (FastAPI's test client), the batcher, limits,
token, verdicts from a calibrated memory bank, and the real CLI serving over a socket."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from service_helpers import png_bytes, tiny_pipeline_config

fastapi = pytest.importorskip("fastapi")
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from filo.service.batcher import MicroBatcher, QueueFull  # noqa: E402
from filo.service.config import ServiceConfig  # noqa: E402

CLASS = "tex_a"


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def pipeline_config(tiny_filo_ckpt, tiny_grounding_ckpt, bert_vocab_dir, synthetic_prompts):
    return tiny_pipeline_config(tiny_filo_ckpt, tiny_grounding_ckpt, bert_vocab_dir,
                                synthetic_prompts)


@pytest.fixture(scope="module")
def pipeline(pipeline_config):
    from filo.pipeline import build_pipeline

    return build_pipeline(pipeline_config)


def make_client(pipeline, tmp_path, token=None, **service):
    from filo.service.app import create_app
    from filo.service.engine import Engine

    cfg = ServiceConfig(**service)
    engine = Engine(pipeline, cfg, tmp_path / "out")
    return TestClient(create_app(engine, cfg, token)), engine


def post(client, data: bytes = None, name="part.png", headers=None, **form):
    form.setdefault("class_name", CLASS)
    return client.post("/v1/predict", files={"image": (name, data or png_bytes(), "image/png")},
                       data={k: str(v) for k, v in form.items()}, headers=headers or {})


def expected_prediction(pipeline, data: bytes, tmp_path: Path, cls_name=CLASS):
    """The batch pipeline on the same image saved as a file (EvalDataset path), independently of
    the service's decoding."""
    from filo.data.dataset import EvalDataset, collate
    from filo.data.records import Sample

    path = tmp_path / f"expect_{len(list(tmp_path.glob('expect_*')))}.png"
    path.write_bytes(data)
    ds = EvalDataset([Sample(str(path), "", cls_name, "", 0)], "/", pipeline.image_size,
                     with_detector_input=pipeline.needs_detector_input,
                     memory_transform=pipeline.memory_transform)
    return pipeline.predict(collate([ds[0]]))[0]


# --------------------------------------------------------------------------- API

def test_health_classes_and_openapi(pipeline, tmp_path):
    client, _ = make_client(pipeline, tmp_path)
    with client:
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["queue"]["waiting"] == 0
        info = client.get("/v1/classes").json()
        names = [c["name"] for c in info["classes"]]
        assert names == ["tex_a", "tex_b", "obj_a", "obj_b"]  # the prompt file's order
        assert info["classes"][2]["phrases"] == ["scratch", "blob", "colour spot", "missing part"]
        assert info["classes"][2]["table_key"] == "obj a"  # the prompt file's spelling
        assert info["classes"][2]["object_word"] == "obj a"  # the word inside the sentences
        assert info["defaults"]["box_threshold"] == 0.0 and info["defaults"]["area_threshold"] == 0.7
        assert info["models"] == {"filo": True, "grounding": True, "memory_bank": False,
                                  "fusion": None}
        schema = client.get("/openapi.json").json()
        form = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
        props = next(iter(form.values()))["schema"]
        assert "/v1/classes" in schema["paths"] and "/healthz" in schema["paths"]
        assert client.get("/docs").status_code == 404  # its page would need a CDN
        assert props  # the multipart form is described
        page = client.get("/")
        assert page.status_code == 200 and "script-src 'self'" in page.headers[
            "content-security-policy"]


def test_predict_matches_the_batch_pipeline_and_writes_overlay_and_mask(pipeline, tmp_path):
    data = png_bytes(seed=3, size=(56, 40))
    want = expected_prediction(pipeline, data, tmp_path)
    client, engine = make_client(pipeline, tmp_path)
    with client:
        r = post(client, data, mask_threshold=0.4)
        assert r.status_code == 200, r.text
        res = r.json()
    assert res["image_score"] == pytest.approx(want.image_score, abs=1e-6)
    assert res["position"] == want.position
    det = want.detection
    assert [b["box"] for b in res["boxes"]] == [[round(float(v), 2) for v in b]
                                               for b in det["boxes"]]
    assert [b["phrase"] for b in res["boxes"]] == det["phrases"]
    assert [b["counted"] for b in res["boxes"]] == [bool(m) for m in det["matched"]]
    assert res["verdict"] is None and "no calibrated memory bank" in res["verdict_note"]
    assert res["image_size"] == [56, 40] and res["mask_threshold"] == 0.4
    folder = engine.out_dir / res["id"]
    mask = np.asarray(Image.open(folder / "mask.png"))
    full = np.asarray(Image.fromarray(want.anomaly_map.astype(np.float32), mode="F").resize(
        (56, 40), Image.BILINEAR))
    assert mask.shape == (40, 56) and np.array_equal(mask > 0, full >= 0.4)
    assert res["anomalous_fraction"] == pytest.approx(float((full >= 0.4).mean()))
    with client:
        overlay = client.get(res["overlay_url"])
        assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(overlay.content)).size[1] >= 40
        assert client.get(res["result_url"]).json()["id"] == res["id"]


def test_request_phrases_and_thresholds_equal_a_pipeline_built_with_them(
        pipeline, pipeline_config, tmp_path, synthetic_prompts):
    from dataclasses import replace

    from filo.pipeline import build_pipeline

    data = png_bytes(seed=5)
    edited = tmp_path / "edited.yaml"
    edited.write_text(synthetic_prompts.read_text().replace(
        "tex a: [scratch, blob, colour spot]", "tex a: [hole, oil stain]"))
    other = build_pipeline(replace(pipeline_config, prompts=edited, box_threshold=0.3,
                                   outside_box_factor=0.5))
    want = expected_prediction(other, data, tmp_path)
    default = expected_prediction(pipeline, data, tmp_path)
    assert want.image_score != pytest.approx(default.image_score, abs=1e-6)
    client, _ = make_client(pipeline, tmp_path)
    with client:
        res = post(client, data, phrases="hole\n\n oil stain \n", box_threshold=0.3,
                   outside_box_factor=0.5).json()
        again = post(client, data).json()  # the service's own settings are back
    assert res["image_score"] == pytest.approx(want.image_score, abs=1e-6)
    assert [b["phrase"] for b in res["boxes"]] == want.detection["phrases"]
    assert res["settings"]["phrases"] == ["hole", "oil stain"]
    assert res["settings"]["box_threshold"] == 0.3
    assert again["image_score"] == pytest.approx(default.image_score, abs=1e-6)
    assert again["settings"]["phrases"] == ["scratch", "blob", "colour spot"]


def test_concurrent_requests_share_batches_and_keep_their_own_results(pipeline, tmp_path):
    images = [png_bytes(seed=10 + i) for i in range(6)]
    want = [expected_prediction(pipeline, d, tmp_path).image_score for d in images]
    client, _ = make_client(pipeline, tmp_path, max_batch_size=4, max_wait_ms=300)
    results = [None] * 6
    with client:
        def go(i):
            results[i] = post(client, images[i]).json()

        threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = client.get("/healthz").json()["batches"]
    assert [r["image_score"] for r in results] == pytest.approx(want, abs=1e-5)
    assert stats["jobs"] == 6 and stats["batches"] < 6 and stats["largest_batch"] <= 4
    assert max(r["timing_ms"]["batch_size"] for r in results) > 1


# --------------------------------------------------------------------------- bad input

def test_bad_input_gets_a_clear_4xx(pipeline, tmp_path):
    client, _ = make_client(pipeline, tmp_path, max_upload_mb=0.05, max_image_pixels=5000)
    gif = io.BytesIO()
    Image.new("RGB", (20, 20)).save(gif, format="GIF")
    cases = [
        (dict(data=b"not an image at all"), 400, "cannot read image part.png"),
        (dict(data=gif.getvalue(), name="x.gif"), 415, "format GIF is not accepted"),
        (dict(data=png_bytes(size=(100, 60))), 400, "100x60 pixels"),
        (dict(data=os.urandom(80_000)), 413, "larger than"),
        (dict(class_name="no_such"), 422, "class_name 'no_such' is unknown"),
        (dict(box_threshold=1.5), 422, "box_threshold 1.5: must be in [0.0, 1.0]"),
        (dict(area_threshold=0), 422, "area_threshold 0.0"),
        (dict(phrases="crack. dent"), 400, "may not contain"),
        (dict(phrases="x" * 200), 400, "longer than"),
        (dict(name="../../etc/passwd"), 200, None),  # a client's file name is only a label
    ]
    with client:
        for kwargs, status, text in cases:
            r = post(client, **kwargs)
            assert r.status_code == status, (kwargs.keys(), r.text)
            if text:
                assert text in r.json()["detail"], r.json()
            else:
                assert r.json()["filename"] == "passwd"
        r = client.post("/v1/predict", data={"class_name": CLASS})  # no image
        assert r.status_code == 422
        for bad in ("/v1/results/../../etc/passwd", "/v1/results/" + "a" * 32 + "/secret.txt",
                    "/v1/results/" + "g" * 32 + "/mask.png", "/v1/results/" + "a" * 32
                    + "/mask.png", "/static/..%2Fapp.py", "/static/app.py"):
            assert client.get(bad).status_code == 404, bad
    assert not list((tmp_path / "out").glob("**/passwd*"))


def test_token_guards_the_api_but_not_health_or_page(pipeline, tmp_path):
    token = "s3cret-token-of-enough-length"
    client, _ = make_client(pipeline, tmp_path, token=token)
    with client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/").status_code == 200
        assert client.get("/v1/classes").status_code == 401
        r = post(client, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in r.json()["detail"]
        ok = post(client, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
        assert client.get(ok.json()["mask_url"]).status_code == 401
        assert client.get(ok.json()["mask_url"],
                          headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_full_queue_answers_503_with_retry_after(pipeline, tmp_path):
    from filo.service.app import create_app
    from filo.service.engine import Engine

    cfg = ServiceConfig(queue_size=1, max_batch_size=1, max_wait_ms=0)
    engine = Engine(pipeline, cfg, tmp_path / "out")
    gate, entered = threading.Event(), threading.Event()
    real = engine.run_batch

    def slow(batch):
        entered.set()
        gate.wait(20)
        return real(batch)

    engine.run_batch = slow
    client = TestClient(create_app(engine, cfg))
    codes = []
    with client:
        def go():
            codes.append(post(client).status_code)

        first = threading.Thread(target=go)
        first.start()
        assert entered.wait(20)  # the worker holds the first request
        second = threading.Thread(target=go)
        second.start()  # waits in the queue (size 1)
        deadline = time.monotonic() + 10
        while client.get("/healthz").json()["queue"]["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = post(client)  # the queue is full
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert "busy" in r.json()["detail"]
        gate.set()
        first.join()
        second.join()
    assert codes == [200, 200]


def test_old_results_are_deleted_beyond_keep_results(pipeline, tmp_path):
    client, engine = make_client(pipeline, tmp_path, keep_results=2)
    with client:
        ids = [post(client, png_bytes(seed=i)).json()["id"] for i in range(3)]
        assert client.get(f"/v1/results/{ids[0]}/mask.png").status_code == 404
        assert client.get(f"/v1/results/{ids[2]}/mask.png").status_code == 200
    assert sorted(p.name for p in engine.out_dir.iterdir()) == sorted(ids[1:])


# --------------------------------------------------------------------------- batcher

def test_batcher_groups_orders_and_bounds():
    seen = []
    gate = threading.Event()

    def run(payloads):
        gate.wait(10)
        seen.append(list(payloads))
        return [ValueError("bad") if p == "bad" else p * 2 for p in payloads]

    b = MicroBatcher(run, max_batch=3, max_wait_s=0.05, queue_size=4).start()
    try:
        first = b.submit(1)  # taken by the worker, which waits on the gate
        time.sleep(0.2)
        futures = [b.submit(p) for p in (2, 3, "bad", 5)]
        with pytest.raises(QueueFull) as full:
            b.submit(6)
        assert full.value.retry_after >= 1 and b.stats.rejected == 1
        gate.set()
        assert first.result(10) == 2
        assert [f.result(10) for f in futures if f is not futures[2]] == [4, 6, 10]
        with pytest.raises(ValueError):
            futures[2].result(10)
    finally:
        b.stop()
    assert seen[0] == [1] and seen[1] == [2, 3, "bad"] and seen[2] == [5]
    assert b.stats.batches == 3 and b.stats.largest_batch == 3
    with pytest.raises(RuntimeError):
        b.submit(7)


def test_batcher_failure_of_a_batch_fails_its_jobs_only():
    calls = []

    def run(payloads):
        calls.append(payloads)
        if "boom" in payloads:
            raise RuntimeError("model failed")
        return payloads

    b = MicroBatcher(run, max_batch=1, max_wait_s=0, queue_size=8).start()
    try:
        bad, good = b.submit("boom"), b.submit("ok")
        with pytest.raises(RuntimeError, match="model failed"):
            bad.result(10)
        assert good.result(10) == "ok"
    finally:
        b.stop()


# --------------------------------------------------------------------------- memory bank verdicts

@pytest.fixture(scope="module")
def banks(tmp_path_factory, tiny_filo_ckpt, synthetic_prompts):
    from filo.cli.memory import main
    from filo.data.synthetic import make_mvtec_like

    tmp = tmp_path_factory.mktemp("svc_banks")
    make_mvtec_like(tmp / "data", classes=(CLASS,), n_train_good=6, n_test_good=1,
                    n_test_defect=1, size=64, seed=11)
    rc = main(["build", "--dataset", "mvtec", "--data_path", str(tmp / "data"), "--out",
               str(tmp / "banks"), "--backbone", "clip", "--layers", "2,3", "--ckpt_path",
               str(tiny_filo_ckpt[0]), "--prompts", str(synthetic_prompts), "--device", "cpu",
               "--resize", "40", "--imagesize", "32", "--calib_fraction", "0.34"])
    assert rc in (0, None)
    return tmp / "banks"


def test_calibrated_verdicts_and_masks_from_the_memory_bank(pipeline_config, banks, tmp_path):
    from dataclasses import replace

    from filo.memory.bank import load_bank
    from filo.pipeline import build_pipeline

    cal = load_bank(banks, CLASS)[1].calibration
    memory = build_pipeline(replace(pipeline_config, memory_bank=banks, fusion="memory",
                                    grounded_checkpoint=None))
    client, _ = make_client(memory, tmp_path)
    with client:
        info = client.get("/v1/classes").json()
        assert [c["name"] for c in info["classes"]] == [CLASS]
        assert info["classes"][0]["image_threshold"] == pytest.approx(cal["image_threshold"])
        verdicts = set()
        for seed in range(4):
            res = post(client, png_bytes(seed=seed, size=(64, 64))).json()
            assert res["image_threshold"] == pytest.approx(cal["image_threshold"])
            assert res["verdict"] == ("anomalous" if res["image_score"] >= cal["image_threshold"]
                                      else "normal")
            # verdict, mask and colour scale from the one calibrated (image) threshold: an
            # anomalous verdict always shows a region, a normal one never does
            assert res["mask_threshold_source"] == "calibrated image threshold"
            assert (res["anomalous_fraction"] > 0) == (res["verdict"] == "anomalous")
            t = cal["image_threshold"] * res["map_max"] / res["image_score"]
            assert res["mask_threshold"] == pytest.approx(t, rel=0.05)
            assert res["color_scale"] == pytest.approx([0.0, 2 * res["mask_threshold"]])
            verdicts.add(res["verdict"])
        r = post(client, phrases="hole")
        assert r.status_code == 422 and "memory bank alone" in r.json()["detail"]
        # raw PatchCore distances: the colour scale and mask thresholds follow the calibration
        assert info["classes"][0]["map_range"] == pytest.approx([0.0, 2 * cal["pixel_threshold"]])
        high = 1.5 * cal["pixel_threshold"]
        r = post(client, png_bytes(size=(64, 64)), mask_threshold=high)
        assert r.status_code == 200 and r.json()["mask_threshold"] == pytest.approx(high)
        assert post(client, mask_threshold=-1).status_code == 422

    fused = build_pipeline(replace(pipeline_config, memory_bank=banks, fusion="mean"))
    client, _ = make_client(fused, tmp_path / "fused")
    with client:
        assert client.get("/v1/classes").json()["classes"][0]["map_range"] == [0.0, 1.0]
        assert post(client, mask_threshold=1.5).status_code == 422  # fused maps are in [0, 1]
        plain = post(client, png_bytes(size=(64, 64))).json()
        assert plain["verdict"] in ("normal", "anomalous")
        assert plain["mask_threshold_source"] == "calibrated image threshold"
        assert (plain["anomalous_fraction"] > 0) == (plain["verdict"] == "anomalous")
        edited = post(client, png_bytes(size=(64, 64)), phrases="hole").json()
        assert edited["verdict"] is None and "calibrated" in edited["verdict_note"]
        assert edited["mask_threshold_source"] == "service default"


def test_warm_up_makes_the_first_request_as_fast_as_later_ones(pipeline_config, banks,
                                                               tmp_path):
    """Each model's own input size is stated; after Engine.warmup (what the CLI runs before
    the port opens) the first request takes at most twice the later ones."""
    import time
    from dataclasses import replace

    from filo.pipeline import build_pipeline

    fused = build_pipeline(replace(pipeline_config, memory_bank=banks, fusion="mean"))
    client, engine = make_client(fused, tmp_path)
    assert engine.warmup() == 1
    assert not any((tmp_path / "out").iterdir())  # warming writes no result
    with client:
        sizes = client.get("/v1/classes").json()["input_sizes"]
        assert sizes["filo"] == 32 and sizes["memory_bank"] == {CLASS: 32}
        assert sizes["grounding"]["short_side"] > 32
        walls = []
        for seed in range(5):
            t0 = time.perf_counter()
            assert post(client, png_bytes(seed=seed, size=(64, 64))).status_code == 200
            walls.append(time.perf_counter() - t0)
    later = float(np.median(walls[1:]))
    assert walls[0] <= 2 * later + 0.05, walls


# --------------------------------------------------------------------------- CLI

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_refuses_bad_setup_in_one_line(tmp_path, pipeline_config, capsys):
    from filo.cli.serve import main

    def run(*argv):
        try:
            return main(list(argv))
        except SystemExit as exc:
            return exc.code

    short = tmp_path / "token"
    short.write_text("abc\n")
    assert run("--ckpt_path", str(pipeline_config.ckpt_path), "--token_file", str(short)) == 2
    assert "at least 16 characters" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert run("--ckpt_path", str(pipeline_config.ckpt_path), "--port", str(port),
                   "--out_dir", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]
    assert run("--port", "70000") == 2
    assert "--port" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_serves_over_a_real_socket(tmp_path, pipeline_config):
    import httpx

    port = _free_port()
    token = tmp_path / "token"
    token.write_text("a-token-with-enough-characters\n")
    c = pipeline_config
    cmd = [sys.executable, "-m", "filo", "serve", "--ckpt_path", str(c.ckpt_path),
           "--grounded_checkpoint", str(c.grounded_checkpoint), "--bert_dir", str(c.bert_dir),
           "--prompts", str(c.prompts), "--image_size", "32", "--device", "cpu",
           "--box_threshold", "0", "--text_threshold", "0", "--port", str(port),
           "--out_dir", str(tmp_path / "out"), "--token_file", str(token)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180  # model load and warm-up come before the port
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the service did not come up"
            time.sleep(0.2)
        auth = {"Authorization": "Bearer a-token-with-enough-characters"}
        r = httpx.post(f"{url}/v1/predict", headers=auth, data={"class_name": CLASS},
                       files={"image": ("p.png", png_bytes(), "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
        assert 0.0 <= r.json()["image_score"] <= 1.0
        assert (tmp_path / "out" / r.json()["id"] / "mask.png").is_file()
        assert httpx.get(f"{url}/v1/classes", timeout=5).status_code == 401
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, -15), err.decode()[-2000:]
    assert f"serving on http://127.0.0.1:{port}/" in out.decode()
    json.dumps(r.json())  # the response is plain JSON


def test_body_limit_stops_a_streamed_body_without_content_length():
    from filo.service.app import BodyLimit

    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request):
        return {"n": len(await request.body())}

    app.add_middleware(BodyLimit, limit=1000)
    client = TestClient(app)

    def chunks():
        for _ in range(10):
            yield b"x" * 300

    r = client.post("/echo", content=chunks())
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413 and "larger than" in r.json()["detail"]
    assert client.post("/echo", content=b"x" * 1000).json() == {"n": 1000}
    assert client.post("/echo", content=b"x" * 1001).status_code == 413


def test_a_bank_without_calibration_scores_serves_without_verdicts(pipeline_config, banks,
                                                                   tmp_path):
    """Banks written before calibration scores were recorded: no fused threshold, no crash."""
    import shutil
    from dataclasses import replace

    from filo.pipeline import build_pipeline

    old = tmp_path / "old_banks"
    shutil.copytree(banks, old)
    meta_path = old / CLASS / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["calibration"].pop("image_scores")
    meta["calibration"]["filo"].pop("image_scores")
    meta.pop("checksum")  # banks of that filo had no checksum either
    meta_path.write_text(json.dumps(meta))
    fused = build_pipeline(replace(pipeline_config, memory_bank=old, fusion="mean"))
    assert fused.calibration(CLASS) is None
    client, _ = make_client(fused, tmp_path)
    with client:
        assert client.get("/v1/classes").json()["classes"][0]["calibrated"] is False
        res = post(client, png_bytes(size=(64, 64))).json()
        assert res["verdict"] is None and "no calibrated memory bank" in res["verdict_note"]


def test_an_unexpected_failure_is_a_json_500(pipeline, tmp_path):
    client, engine = make_client(pipeline, tmp_path)

    def broken():
        raise KeyError("image_scores")

    engine.classes_info = broken
    with TestClient(client.app, raise_server_exceptions=False) as c:
        r = c.get("/v1/classes")
    assert r.status_code == 500
    assert r.json() == {"detail": "internal error: KeyError: 'image_scores'"}

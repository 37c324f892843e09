"""Seeds fuzz/corpus/<target>/ from ../shared/fixtures (run from the repo root:
python3 fuzz/seed_corpus.py). The corpus is checked in; the test run replays
it (tests/fuzzing/src/tests.rs) and `cargo fuzz run <target> fuzz/corpus/<target>`
grows it."""

import base64
import gzip
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from wire import push_request  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures"
if not FIXTURES.is_dir():
    FIXTURES = pathlib.Path("/work/shared/fixtures")
CORPUS = ROOT / "fuzz" / "corpus"
SMALL = 300_000


def put(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


pprofs = [p for p in sorted((FIXTURES / "pprof").iterdir()) if p.stat().st_size < SMALL]
for p in pprofs + sorted((FIXTURES / "pprof-invalid").iterdir()):
    put("pprof", p.name, p.read_bytes())
for p in pprofs[:6]:
    raw = p.read_bytes()
    labels = {"__name__": "process_cpu", "service_name": "fuzz", "env": "ci"}
    put("push_proto", p.name + ".req", push_request([(labels, [raw])]))
    put("push_proto", p.name + ".req.gz", gzip.compress(push_request([(labels, [raw])])))
    body = {"series": [{"labels": [{"name": k, "value": v} for k, v in labels.items()],
                        "samples": [{"rawProfile": base64.b64encode(raw).decode()}]}]}
    put("push_json", p.name + ".json", json.dumps(body).encode())
for name, text in {
    "folded": "main;work;leaf 10\nmain;idle 3\n",
    "deep": ";".join(f"f{i}" for i in range(1200)) + " 1\n",
    "crlf": "a;b 1\r\na;b 2\r\n",
    "bad-value": "a;b x\n",
    "empty-frames": ";;; 4\n;a;;b; 5\n",
}.items():
    put("ingest_folded", name, text.encode())
for name, text in {
    "basic": "name=app.cpu{env=prod,region=eu}&from=1700000000&until=1700000010&format=folded",
    "pprof": "name=app.alloc_objects&format=pprof&sampleRate=100&spyName=gospy",
    "bad-tags": "name=app.cpu{env",
    "times": "name=x&from=-1&until=99999999999999999999",
}.items():
    put("ingest_query", name, text.encode())
for name, text in {
    "simple": '{service_name="api"}',
    "all-ops": '{service_name="api", env!="dev", pod=~"p-[0-9]+", region!~"us.*"}',
    "empty": "{}",
    "escapes": '{a="x\\"y\\\\z"}',
    "bad": '{a=~"("}',
}.items():
    put("selector", name, text.encode())
def part(name, data):
    return (b"--ember-fuzz\r\nContent-Disposition: form-data; name=\"" + name.encode()
            + b"\"; filename=\"profile.pprof\"\r\nContent-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")


raw = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
for name, body in {
    "profile": part("profile", raw) + b"--ember-fuzz--\r\n",
    "prev-and-profile": part("prev_profile", raw) + part("profile", raw)
    + part("sample_type_config", b'{"cpu":{"units":"samples"}}') + b"--ember-fuzz--\r\n",
    "no-profile": part("other", b"x") + b"--ember-fuzz--\r\n",
    "truncated": part("profile", raw)[:200],
    "empty": b"",
}.items():
    put("ingest_multipart", name, body)
otlp = (FIXTURES / "otlp" / "otel-ebpf-profile.pb.bin").read_bytes()
for name, body in {
    "ebpf": otlp,
    "ebpf.gz": gzip.compress(otlp),
    "truncated": otlp[: len(otlp) // 3],
    "empty": b"",
}.items():
    put("otlp_proto", name, body)
otlp_json = (FIXTURES / "otlp" / "otel-ebpf-profile.pb.json").read_bytes()
small = json.loads(otlp_json)
small["resourceProfiles"] = small["resourceProfiles"][:3]
for name, body in {
    "ebpf-3.json": json.dumps(small).encode(),
    "snake-case.json": json.dumps({"resource_profiles": [{"scope_profiles": [{"profiles": [
        {"sample_type": {"type_strindex": 1, "unit_strindex": 2},
         "samples": [{"stack_index": 1, "values": ["5"]}]}]}]}],
        "dictionary": {"string_table": ["", "cpu", "nanoseconds", "main"],
                       "function_table": [{}, {"name_strindex": 3}],
                       "location_table": [{}, {"lines": [{"function_index": 1}]}],
                       "stack_table": [{}, {"location_indices": [1]}]}}).encode(),
    "bad-index.json": b'{"resourceProfiles":[{"scopeProfiles":[{"profiles":[{"samples":[{"stackIndex":7}]}]}]}],"dictionary":{}}',
}.items():
    put("otlp_json", name, body)
jfr = gzip.decompress((FIXTURES / "jfr" / "kafka-cpu.jfr.gz").read_bytes())
for name, body in {
    "kafka-cpu.jfr.gz": (FIXTURES / "jfr" / "kafka-cpu.jfr.gz").read_bytes(),
    "header": jfr[:68],
    "half": jfr[: len(jfr) // 2],
    "two-chunks": jfr + jfr,
}.items():
    put("ingest_jfr", name, body)
print("corpus:", {d.name: len(list(d.iterdir())) for d in sorted(CORPUS.iterdir())})

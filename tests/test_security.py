"""Security defaults: services listen on loopback, nothing loads pickles, remote code only on request."""

import ast
import ipaddress
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "raysparse"
# Calls that deserialise pickles (or run code) from whatever they are given.
UNSAFE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
                ("dill", "load"), ("dill", "loads"), ("joblib", "load"), ("yaml", "load"), ("yaml", "unsafe_load"),
                ("marshal", "loads"), ("shelve", "open"), ("builtins", "eval"), ("builtins", "exec")}


def call_sites(tree: ast.AST):
    """(owner, name, call) for every call ``owner.name(...)`` or ``name(...)`` (owner "builtins")."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute):
                owner = node.func.value
                yield (owner.id if isinstance(owner, ast.Name) else ast.unparse(owner)), node.func.attr, node
            elif isinstance(node.func, ast.Name):
                yield "builtins", node.func.id, node


def keyword(call: ast.Call, name: str):
    found = [k.value for k in call.keywords if k.arg == name]
    return found[0] if found else None


def test_the_package_loads_no_pickles_and_trusts_no_remote_code():
    problems = []
    for path in PACKAGE.rglob("*.py"):
        where = path.relative_to(REPO)
        for owner, name, call in call_sites(ast.parse(path.read_text())):
            line = f"{where}:{call.lineno}: {ast.unparse(call)[:120]}"
            if (owner, name) in UNSAFE_CALLS:
                problems.append(f"{line} deserialises or runs arbitrary input")
            if (owner, name) == ("np", "load") and isinstance(keyword(call, "allow_pickle"), ast.Constant) \
                    and keyword(call, "allow_pickle").value:
                problems.append(f"{line} allows pickles")
            if (owner, name) == ("torch", "load"):
                weights_only = keyword(call, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{line} without weights_only=True")
            trust = keyword(call, "trust_remote_code")
            if isinstance(trust, ast.Constant) and trust.value is True:
                problems.append(f"{line} trusts remote code unconditionally")
            if name == "from_pretrained" and owner.startswith("Auto") and trust is None:
                problems.append(f"{line} does not say trust_remote_code")
    assert not problems, "\n".join(problems)


def shipping_code(folder: Path, marker: Path) -> None:
    """Make the model folder ship a config class whose import appends to ``marker``."""
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_shipped.ShippedConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_shipped.py").write_text(
        f"open({str(marker)!r}, 'a').write('ran')\n"
        "from transformers import BertConfig\n\nclass ShippedConfig(BertConfig):\n    pass\n")


@pytest.mark.timeout(300)
def test_runs_pass_the_specs_trust_remote_code_to_every_load(tmp_path, tiny_model_dir):
    """A run's own loads (model and tokenizer, as every worker builds its pipeline) run a model's
    shipped code exactly when the spec's model.trust_remote_code says so, and preflight does too."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path / "model"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, trust_remote_code=False)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=130)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker = tmp_path / "ran"
    shipping_code(folder, marker)
    script = ("import sys\n"
              "from raysparse.errors import RaysparseError\n"
              "from raysparse.runner import as_spec, preflight\n"
              "from raysparse.training.pipeline import build_pipeline\n"
              "from raysparse.training.session import LocalSession\n"
              "spec = as_spec({'model': {'source': sys.argv[1], 'trust_remote_code': sys.argv[2] == '1'},\n"
              "                'data': {'task': 'xnli', 'languages': ['en', 'de'], 'max_length': 32}})\n"
              "try:\n"
              "    if sys.argv[3] == 'preflight':\n        preflight(spec)\n"
              "    else:\n        build_pipeline(spec, {'evaluation': ['en'], 'finetune': ['en'], 'scoring': ['en']},"
              " LocalSession())\n"
              "    print('loaded')\n"
              "except RaysparseError as exc:   # the shipped config class has no model class: loading stops there\n"
              "    print('refused:', exc)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for where in ("pipeline", "preflight"):
        for trust in ("0", "1"):
            marker.unlink(missing_ok=True)
            proc = subprocess.run([sys.executable, "-c", script, str(folder), trust, where], timeout=150, check=True,
                                  capture_output=True, text=True,
                                  env={**env, "HF_MODULES_CACHE": str(tmp_path / f"modules-{where}-{trust}")})
            assert marker.exists() == (trust == "1"), f"{where}, trust_remote_code={trust}: {proc.stdout}"
            if trust == "0":   # untrusted, the folder loads as the plain BERT it also is
                assert proc.stdout.strip() == "loaded", proc.stdout


@pytest.mark.timeout(180)
def test_code_shipped_with_a_model_runs_only_when_trusted(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "model"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)
    marker = tmp_path / "ran"
    shipping_code(folder, marker)
    script = ("import sys, raysparse\n"
              "trust = sys.argv[2] == '1'\n"
              "try:\n    raysparse.load_model(sys.argv[1], trust_remote_code=trust)\n"
              "except Exception as exc:\n    print('refused:', exc)\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    for trust in ("0", "1"):
        subprocess.run([sys.executable, "-c", script, str(folder), trust], env=env, timeout=150, check=True,
                       capture_output=True)
        assert marker.exists() == (trust == "1"), f"trust_remote_code={trust}"


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, raw))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


@pytest.mark.timeout(300)
def test_started_services_listen_on_loopback_and_ray_wants_a_token(tracking_server, local_cluster):
    import inspect

    from raysparse.cluster import LocalClusterSpec
    from raysparse.tracking.server import start_server

    assert inspect.signature(start_server).parameters["host"].default == "127.0.0.1"
    assert LocalClusterSpec().host == "127.0.0.1" and is_loopback(LocalClusterSpec().node_ip)
    for url in (tracking_server, local_cluster.dashboard_url):
        addresses = listening_addresses(int(url.rsplit(":", 1)[1]))
        assert addresses and all(is_loopback(a) for a in addresses), (url, addresses)
    # Ray's own gRPC services listen on every interface (Ray has no setting for that); token
    # authentication is what guards them and the jobs API: no token, no access.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{local_cluster.dashboard_url}/api/jobs/", timeout=30)
    assert refused.value.code == 401

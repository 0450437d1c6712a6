"""ModelTable (which pools serve a model), `@model` in the server lists, model names read from /v1/models."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from pdproxy.errors import InvalidRequest, ModelNotFound
from pdproxy.health import StateBoard
from pdproxy.membership import Hooks, Membership, read_state_file
from pdproxy.model_discovery import served_names
from pdproxy.served_models import ModelTable
from pdproxy.settings import UpstreamSpec
from pdproxy.upstreams import Role, State, Upstream, UpstreamPool


def up(n: int, role: Role, *models: str) -> Upstream:
    return Upstream(role, f"http://10.0.0.{n}:8000", models=models, models_fixed=bool(models))


def table(*members: Upstream) -> tuple[ModelTable, dict[Role, UpstreamPool]]:
    pools = {role: UpstreamPool(role, [u for u in members if u.role is role]) for role in Role}
    return ModelTable(pools), pools


def test_no_names_known_is_one_model_and_resolve_never_reads_the_name() -> None:
    models, pools = table(up(1, Role.PREFILL), up(2, Role.DECODE))
    assert models.single is models.everything
    assert models.everything.prefill is pools[Role.PREFILL] and models.everything.decode is pools[Role.DECODE]
    for name in (None, "anything", 7):
        assert models.resolve(name) is models.everything
    assert models.names == []


def test_one_set_of_names_everywhere_is_one_model_with_its_names_known() -> None:
    models, _ = table(up(1, Role.PREFILL, "m", "lora-a"), up(2, Role.DECODE, "m", "lora-a"), up(3, Role.DECODE))
    assert models.single is models.everything  # a member still unknown does not split the proxy
    assert models.names == ["lora-a", "m"]


def test_several_models_split_the_pools_by_name() -> None:
    pa, da = up(1, Role.PREFILL, "a"), up(2, Role.DECODE, "a")
    pb, db = up(3, Role.PREFILL, "b"), up(4, Role.DECODE, "b")
    unknown = up(5, Role.DECODE)
    models, _ = table(pa, da, pb, db, unknown)
    assert models.single is None
    a, b = models.resolve("a"), models.resolve("b")
    assert (a.prefill.members, a.decode.members, a.model) == ((pa,), (da,), "a")
    assert (b.prefill.members, b.decode.members, b.model) == ((pb,), (db,), "b")
    assert unknown not in (*a.decode.members, *b.decode.members)  # no traffic before its names are known
    with pytest.raises(ModelNotFound, match=r"^The model `c` does not exist\.$") as caught:
        models.resolve("c")
    assert caught.value.status == 404 and orjson.loads(caught.value.body())["error"] == {
        "message": "The model `c` does not exist.", "type": "NotFoundError", "param": None, "code": 404}
    with pytest.raises(InvalidRequest, match="several models"):
        models.resolve(None)
    with pytest.raises(InvalidRequest, match="must be a string"):
        models.resolve(["a"])


def test_a_missing_model_goes_to_the_one_primary_name() -> None:
    """Servers listing the same base model with different LoRA adapters: vLLM's default, the base, is clear."""
    models, _ = table(up(1, Role.PREFILL, "base", "lora-x"), up(2, Role.DECODE, "base", "lora-y"))
    assert models.single is None
    assert models.resolve(None) is models.resolve("base")
    assert models.resolve("lora-x").decode.members == ()


def test_rebuild_keeps_unchanged_pools_and_follows_changes() -> None:
    pa, da = up(1, Role.PREFILL, "a"), up(2, Role.DECODE, "a")
    pb, db = up(3, Role.PREFILL, "b"), up(4, Role.DECODE, "b")
    models, pools = table(pa, da, pb, db)
    a, b = models.resolve("a"), models.resolve("b")
    extra = up(5, Role.DECODE, "b")
    pools[Role.DECODE].add(extra)
    models.rebuild()
    assert models.resolve("a") is a  # its panic state carries on
    assert models.resolve("b") is not b and models.resolve("b").decode.members == (db, extra)
    for u in (pb, db, extra):
        u.models = ("a",)
    models.rebuild()
    assert models.single is models.everything  # back to one model
    assert models.resolve("b") is models.everything


async def test_membership_regroups_on_add_and_removal_and_keeps_configured_models(tmp_path: Path) -> None:
    pools = {role: UpstreamPool(role) for role in Role}
    calls: list[None] = []
    state_file = tmp_path / "state.json"
    membership = Membership(pools, StateBoard(), warmup=False, state_file=state_file,
                            hooks=Hooks(regroup=lambda: calls.append(None)))
    upstream, created = membership.add(Role.DECODE, "http://10.0.0.1:8000", models=("m",))
    assert created and upstream.models == ("m",) and upstream.models_fixed and len(calls) == 1
    membership.add(Role.DECODE, "http://10.0.0.1:8000", models=("n",))
    assert upstream.models == ("n",) and len(calls) == 2
    membership.add(Role.PREFILL, "http://10.0.0.2:8000")
    await membership.flush()
    saved = read_state_file(state_file)
    assert saved is not None and [(s.url, s.models) for s in saved] == [
        ("http://10.0.0.2:8000", ()), ("http://10.0.0.1:8000", ("n",))]
    membership.remove(upstream, force=True)
    assert upstream.state is State.REMOVED and len(calls) == 4


def test_state_file_with_a_bad_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"version": 1, "upstreams": [{"role": "decode", "url": "h:1", "models": ["a b"]}]}')
    with pytest.raises(Exception, match="corrupt"):
        read_state_file(path)


@pytest.mark.parametrize(("text", "url", "model", "weight"), [
    ("h:8100", "http://h:8100", None, 1),
    ("h:8100@llama", "http://h:8100", "llama", 1),
    ("h:8100@meta-llama/Llama-3.1-8B-Instruct=3", "http://h:8100", "meta-llama/Llama-3.1-8B-Instruct", 3),
    ("https://[::1]:443@m", "https://[::1]:443", "m", 1),
])
def test_server_list_entries_take_a_model(text: str, url: str, model: str | None, weight: int) -> None:
    spec = UpstreamSpec.parse(text)
    assert (spec.url, spec.model, spec.weight) == (url, model, weight)
    assert spec.models == ((model,) if model else ())


@pytest.mark.parametrize(("text", "error"), [
    ("h:8100@", "give a model name after '@'"),
    ("h:8100@a b", "printable characters without spaces"),
    ("http://user:pw@h:8100", "scheme://host:port"),  # credentials in a URL stay an error of their own
])
def test_bad_model_in_a_server_list_entry(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        UpstreamSpec.parse(text)


def test_a_config_mapping_takes_a_model() -> None:
    assert UpstreamSpec.model_validate({"url": "h:1", "model": "m", "weight": 2}).models == ("m",)


@pytest.mark.parametrize(("body", "names"), [
    (b'{"object":"list","data":[{"id":"base"},{"id":"lora","parent":"base"},{"id":"base"}]}', ("base", "lora")),
    (b'{"data":[{"id":"ok"},{"id":""},{"id":7},"x",{"id":"has space"}]}', ("ok",)),
    (b'{"data":[]}', None),
    (b'{"data":{}}', None),
    (b'[1]', None),
    (b'not json', None),
])
def test_served_names_from_a_v1_models_answer(body: bytes, names: tuple[str, ...] | None) -> None:
    assert served_names(body) == names


def test_prefix_hash_keeps_a_ring_per_model_taking_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two models' candidate sets in turn: each choice is the one a policy of that model alone makes, and no
    ring is rebuilt per request (one hash per request: its prompt's)."""
    from pdproxy.policies import prefix_hash
    from pdproxy.request import ProxyRequest

    a = [up(i, Role.PREFILL, "a") for i in range(1, 4)]
    b = [up(i, Role.PREFILL, "b") for i in range(4, 7)]
    shared = prefix_hash.PrefixHash(64, 40, 0.25)
    alone = {"a": prefix_hash.PrefixHash(64, 40, 0.25), "b": prefix_hash.PrefixHash(64, 40, 0.25)}
    requests = [ProxyRequest("/v1/completions", {"prompt": f"prompt {i}"}, False, str(i), b"") for i in range(20)]
    for request in requests[:2]:  # every ring built
        shared.choose(a, request), shared.choose(b, request), alone["a"].choose(a, request)
        alone["b"].choose(b, request)
    calls = 0
    real = prefix_hash._hash64

    def counted(text: str) -> int:
        nonlocal calls
        calls += 1
        return real(text)

    monkeypatch.setattr(prefix_hash, "_hash64", counted)
    for request in requests:
        for name, candidates in (("a", a), ("b", b)):
            before = calls
            assert shared.choose(candidates, request) is alone[name].choose(candidates, request)
            assert calls - before == 2  # the request's key, once per policy asked: no ring rebuilt

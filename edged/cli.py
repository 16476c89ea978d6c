"""The ``edged`` command line. Exit status 0 on success; otherwise non-zero with a one-line reason."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from edged.config import DEFAULT_CONFIG, Config
from edged.config import load as load_config
from edged.errors import EdgedError
from edged.store import GRAPHS, QUANTS, default_cache_dir, default_models_dir, find_recipe, list_models, verify

DEFAULT_MODEL = "smollm2-135m-instruct"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _models_dir(args: argparse.Namespace) -> Path:
    chosen = args.models_dir or os.environ.get("EDGED_MODELS_DIR")
    return Path(chosen) if chosen else default_models_dir()


def cmd_model_build(args: argparse.Namespace) -> int:
    from edged.build import build_model

    models_dir = _models_dir(args)
    recipe = find_recipe(models_dir, args.name)
    quant = args.quant or recipe.default_quant
    build_model(recipe, quant, models_dir, default_cache_dir(), _log, force=args.force, graph=args.graph)
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    recipes, built = list_models(_models_dir(args))
    print(f"{'RECIPE':<28} {'DEFAULT':<8} DESCRIPTION")
    for r in recipes:
        print(f"{r.name:<28} {r.default_quant:<8} {r.description}")
    print(f"\n{'BUILT MODEL':<34} {'QUANT':<6} {'SIZE':>9}  PATH")
    for m in built:
        print(f"{m.name:<34} {m.quant or '?':<6} {m.size_bytes / 1e6:>7.1f}MB  {m.path}")
    if not built:
        print(f"(none yet: run `edged model build {DEFAULT_MODEL}`)")
    return 0


def cmd_model_verify(args: argparse.Namespace) -> int:
    model_dir = _models_dir(args) / args.name
    problems = verify(model_dir)
    if problems:
        for p in problems:
            print(f"{args.name}: {p}", file=sys.stderr)
        print(f"{args.name}: FAILED; rebuild with `edged model build {args.name} --force`", file=sys.stderr)
        return 1
    print(f"{args.name}: OK (every file matches its sha256 in manifest.json)")
    return 0


def cmd_model_eval(args: argparse.Namespace) -> int:
    from edged.evaluate import agreement, answer_quality
    from edged.llm import Engine
    from edged.store import read_manifest

    models_dir = _models_dir(args)
    candidate_dir = models_dir / args.name
    recipe_name = read_manifest(candidate_dir).get("recipe") or args.name
    recipe = find_recipe(models_dir, recipe_name)
    reference_dir = models_dir / recipe.dir_name("fp32")
    if not (reference_dir / "model.onnx").is_file():
        from edged.build import build_model

        _log(f"building the fp32 reference {reference_dir.name} first")
        build_model(recipe, "fp32", models_dir, default_cache_dir(), _log)
    reference, candidate = Engine(reference_dir, threads=args.threads), Engine(candidate_dir, threads=args.threads)
    result = agreement(reference, candidate)
    print(f"model      {args.name}")
    print(f"reference  {reference_dir.name}")
    print(f"positions  {result.positions}")
    print(f"top1       {result.top1:.3f}   (teacher-forced next-token agreement with fp32)")
    print(f"kl         {result.kl:.4f}  (nats per position, KL(fp32 || model))")
    if args.answers:
        ours, theirs = answer_quality(candidate), answer_quality(reference)
        print(f"answers    {ours.right}/{ours.total} right (fp32: {theirs.right}/{theirs.total}; expected keywords)")
        for question in ours.wrong:
            print(f"  missed   {question}{'' if question in theirs.wrong else '   (fp32 gets it)'}")
        for question in sorted(set(theirs.wrong) - set(ours.wrong)):
            print(f"  got      {question}   (fp32 misses it)")
    return 0


def _config(args: argparse.Namespace) -> Config:
    overrides = {
        "broker": getattr(args, "broker", None),
        "node_id": getattr(args, "node", None),
        "model": getattr(args, "model", None),
        "models_dir": getattr(args, "models_dir", None),
        "sysfs_root": getattr(args, "sysfs_root", None),
    }
    path = Path(args.config) if getattr(args, "config", None) else None
    return load_config(path, dict(os.environ), overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from edged.app import serve

    return serve(_config(args), reload_config=lambda: _config(args))


def cmd_config_check(args: argparse.Namespace) -> int:
    config = load_config(Path(args.file), {}, {})
    broker = config.broker.url or "a private mosquitto on 127.0.0.1"
    print(f"{args.file}: OK (node {config.node_id}, model {config.model}, broker {broker})")
    return 0


def cmd_profile_list(args: argparse.Namespace) -> int:
    config = _config(args)
    print(f"{'PROFILE':<20} {'MAX':>5} {'KNOWLEDGE':<12} {'FORMAT':<7} DESCRIPTION")
    for name, p in sorted(config.profiles.items()):
        shape = "" if p.format is None else "json" if p.format == "json" else "schema"
        default = " (default)" if name == config.profile else ""
        print(f"{name:<20} {p.max_tokens or '':>5} {p.knowledge:<12} {shape:<7} {p.description}{default}")
    if not config.profiles:
        print(f"(none: add NAME.toml files to {config.resolved_profiles_dir()} or [profiles.NAME] tables)")
    return 0


def cmd_profile_show(args: argparse.Namespace) -> int:
    import json

    config = _config(args)
    if args.name not in config.profiles:
        known = ", ".join(sorted(config.profiles)) or "none"
        raise ValueError(f"no profile {args.name!r}; profiles: {known}")
    print(json.dumps(config.profiles[args.name].as_dict(), indent=2, ensure_ascii=False))
    return 0


def cmd_kb_build(args: argparse.Namespace) -> int:
    from edged.knowledge import build

    source = Path(args.dir)
    if not source.is_dir():
        raise ValueError(f"{source} is not a folder of Markdown or text documents")
    name = args.output or source.resolve().name
    build(source, _config(args).resolved_knowledge_dir() / name, _log)
    print(f"knowledge base {name}: name it in a profile with knowledge = {name!r}")
    return 0


def cmd_kb_query(args: argparse.Namespace) -> int:
    from edged.knowledge import KnowledgeBase

    base = KnowledgeBase.load(_config(args).resolved_knowledge_dir() / args.name)
    found = base.search(args.question, k=args.k)
    for f in found:
        print(f"{f.score:6.2f}  {f.passage.file} # {f.passage.heading}\n        {f.passage.text[:300]}")
    if not found:
        print("(nothing in this knowledge base shares a word with the question)")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    if not args.local:
        return _ask_mqtt(args)
    if args.profile:
        raise ValueError("--profile is applied by a node (knowledge base included): ask over MQTT, without --local")
    from edged.llm import Engine, GenerationRequest, Message, SamplingParams

    engine = Engine(_models_dir(args) / args.model, threads=args.threads, context_tokens=args.context_tokens)
    sampling = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
    )

    def answer(question: str) -> None:
        request = GenerationRequest(
            messages=(Message("user", question),),
            max_tokens=args.max_tokens or 256,
            sampling=sampling,
            stop=tuple(args.stop),
        )
        generation = engine.generate(request)
        for delta in generation:
            sys.stdout.write(delta)
            sys.stdout.flush()
        print()
        r = generation.result
        assert r is not None
        _log(
            f"[{r.usage.prompt_tokens} prompt + {r.usage.completion_tokens} answer tokens | "
            f"TTFT {r.timings.ttft_ms:.0f} ms | {r.timings.tokens_per_s:.1f} tok/s | "
            f"total {r.timings.total_ms / 1000:.2f} s | {r.finish_reason}]"
        )

    if args.question is not None:
        answer(args.question)
        return 0
    _log(f"{engine.name} on {engine.session.threads} threads; type a question, Ctrl-D to quit")
    while True:
        try:
            question = input("> ")
        except EOFError:
            print()
            return 0
        if question.strip():
            try:
                answer(question)
            except EdgedError as exc:
                _log(f"error ({exc.code}): {exc.message}")


def _ask_mqtt(args: argparse.Namespace) -> int:
    import json

    from edged.client import AskClient

    if args.question is None:
        raise EdgedError("give a question (or use --local for an interactive session)")
    # only what the asker set: the node's profile and defaults fill in the rest
    fields = {k: v for k, v in (("profile", args.profile), ("max_tokens", args.max_tokens)) if v is not None}
    config = _config(args)
    broker = config.broker.url or f"mqtt://127.0.0.1:{config.broker.local_port}"
    node = None if args.fleet else config.node_id

    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    streaming = args.stream and not args.json
    b = config.broker
    with AskClient(
        broker,
        node,
        prefix=config.topic_prefix,
        password=b.password,
        client=args.client,
        persistent=not args.clean_session,
        # the session outlives this ask (close() ends it); a killed `edged ask` leaves it this long at most
        session_expiry_s=int(args.timeout) + 60,
        ca_file=b.ca_file,
        cert_file=b.cert_file,
        key_file=b.key_file,
    ) as client:
        reply = client.ask(
            args.question,
            timeout_s=args.timeout,
            on_delta=show if streaming else None,
            **fields,
        )
    if args.json:
        print(json.dumps(reply, ensure_ascii=False))
        return 0
    if not streaming:
        sys.stdout.write(reply["text"])
    print()
    t = reply["timings"]
    _log(
        f"[{reply['node']} | {reply['usage']['completion_tokens']} tokens | TTFT {t['ttft_ms']:.0f} ms | "
        f"{t['tokens_per_s']:.1f} tok/s | total {t['total_ms'] / 1000:.2f} s | {reply['finish_reason']}]"
    )
    return 0


def cmd_model_pack(args: argparse.Namespace) -> int:
    from edged.store import pack, read_manifest

    models_dir = _models_dir(args)
    key = str(read_manifest(models_dir / args.name).get("build_key", ""))[:12]
    out = Path(args.output) if args.output else Path(f"{args.name}-{key}.edged.tar")
    pack(models_dir, args.name, out)
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_model_install(args: argparse.Namespace) -> int:
    from edged.store import install

    name, target = install(_models_dir(args), Path(args.bundle))
    print(f"{name}: installed {target.name} and switched to it; `edged model rollback {name}` goes back")
    print("a running daemon picks it up on reload: systemctl reload edged")
    return 0


def cmd_model_rollback(args: argparse.Namespace) -> int:
    from edged.store import rollback

    target = rollback(_models_dir(args), args.name)
    print(f"{args.name}: back to {target.name}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from edged.doctor import run

    source = args.config or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else "defaults (no config file)")
    return run(_config(args), source, dict(os.environ))


def cmd_bench(args: argparse.Namespace) -> int:
    from edged.bench import run

    plot = Path(args.plot) if args.plot else None
    return run(
        _models_dir(args),
        args.model,
        quick=args.quick,
        as_json=args.json,
        threads=args.threads,
        rounds=args.rounds,
        plot=plot,
    )


def cmd_soak(args: argparse.Namespace) -> int:
    from edged.soak import run

    return run(_models_dir(args), args.model, quick=args.quick, as_json=args.json, only=args.scenario or None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edged", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def models_dir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--models-dir", help="where model directories and recipes live (env EDGED_MODELS_DIR)")

    model = sub.add_parser("model", help="build, list, verify and evaluate models")
    msub = model.add_subparsers(dest="model_command", required=True)
    p = msub.add_parser("build", help="build a model directory from a recipe in models/")
    p.add_argument("name")
    p.add_argument("--quant", choices=QUANTS, help="weight format (default: the recipe's)")
    p.add_argument("--graph", choices=GRAPHS, help="decoder graph (default: the recipe's): optimum's export or gqa")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    models_dir_arg(p)
    p.set_defaults(func=cmd_model_build)
    p = msub.add_parser("list", help="recipes and built models")
    models_dir_arg(p)
    p.set_defaults(func=cmd_model_list)
    p = msub.add_parser("verify", help="check every file of a built model against its sha256")
    p.add_argument("name")
    models_dir_arg(p)
    p.set_defaults(func=cmd_model_verify)
    p = msub.add_parser("eval", help="agreement and KL of a build against the fp32 build")
    p.add_argument("name")
    p.add_argument("--threads", type=int)
    p.add_argument("--answers", action="store_true", help="also score 60 factual questions, beside fp32's score")
    models_dir_arg(p)
    p.set_defaults(func=cmd_model_eval)
    p = msub.add_parser("pack", help="write a built model as one bundle file, for offline installs")
    p.add_argument("name")
    p.add_argument("-o", "--output", help="bundle file (default: NAME-BUILDKEY.edged.tar here)")
    models_dir_arg(p)
    p.set_defaults(func=cmd_model_pack)
    p = msub.add_parser("install", help="verify a bundle, unpack it beside the current model, switch to it")
    p.add_argument("bundle")
    models_dir_arg(p)
    p.set_defaults(func=cmd_model_install)
    p = msub.add_parser("rollback", help="switch back to the model version installed before the current one")
    p.add_argument("name")
    models_dir_arg(p)
    p.set_defaults(func=cmd_model_rollback)

    def node_args(p: argparse.ArgumentParser) -> None:
        """The contract's serve flags; they override EDGED_* variables, which override the file."""
        p.add_argument("--config", help=f"TOML file (default {DEFAULT_CONFIG} when present)")
        p.add_argument("--broker", help="mqtt://[user@]host[:port] or mqtts://...; none: a private local broker")
        p.add_argument("--node", help="node id (default: the host name)")
        p.add_argument("--model")
        p.add_argument("--sysfs-root", help="where /sys and /proc are read from (default /)")
        models_dir_arg(p)

    p = sub.add_parser("serve", help="run the daemon")
    node_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="engine speed per build, MQTT overhead and edged against its peers, with ratios")
    p.add_argument("--quick", action="store_true", help="fewer tokens and requests, one round (a smoke run)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--threads", type=int, help="threads for every engine and peer (default 2 for the peers)")
    p.add_argument("--rounds", type=int, help="fresh-process rounds per peer (default 5, --quick 1)")
    p.add_argument("--plot", metavar="FILE.png", help="tok/s against answer position and concurrency (matplotlib)")
    models_dir_arg(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("soak", help="real daemons and Mosquitto under faults; exit 1 when a reply is lost or doubled")
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--scenario", action="append", help="run only this scenario (repeatable): load, broker, ...")
    p.add_argument("--model", default=DEFAULT_MODEL)
    models_dir_arg(p)
    p.set_defaults(func=cmd_soak)

    p = sub.add_parser("config", help="configuration")
    csub = p.add_subparsers(dest="config_command", required=True)
    p = csub.add_parser("check", help="validate a configuration file")
    p.add_argument("file")
    p.set_defaults(func=cmd_config_check)

    p = sub.add_parser("doctor", help="check config, model, broker, sensors, memory and systemd")
    node_args(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("profile", help="assistant profiles")
    psub = p.add_subparsers(dest="profile_command", required=True)
    p = psub.add_parser("list", help="the profiles a node with this configuration serves")
    p.add_argument("--config", help=f"TOML file (default {DEFAULT_CONFIG} when present)")
    p.set_defaults(func=cmd_profile_list)
    p = psub.add_parser("show", help="one profile's settings")
    p.add_argument("name")
    p.add_argument("--config", help=f"TOML file (default {DEFAULT_CONFIG} when present)")
    p.set_defaults(func=cmd_profile_show)

    p = sub.add_parser("kb", help="local knowledge bases for profiles")
    ksub = p.add_subparsers(dest="kb_command", required=True)
    p = ksub.add_parser("build", help="index a folder of Markdown/text documents, split by heading")
    p.add_argument("dir")
    p.add_argument("-o", "--output", metavar="NAME", help="the base's name (default: the folder's name)")
    p.add_argument("--config", help=f"TOML file (default {DEFAULT_CONFIG} when present): knowledge_dir")
    models_dir_arg(p)
    p.set_defaults(func=cmd_kb_build)
    p = ksub.add_parser("query", help="the passages a question retrieves")
    p.add_argument("name")
    p.add_argument("question")
    p.add_argument("-k", type=int, default=3, help="passages at most (default 3)")
    p.add_argument("--config", help=f"TOML file (default {DEFAULT_CONFIG} when present): knowledge_dir")
    models_dir_arg(p)
    p.set_defaults(func=cmd_kb_query)

    p = sub.add_parser("ask", help="ask a question (over MQTT, or --local in this process)")
    p.add_argument("question", nargs="?", help="omit for an interactive session (with --local)")
    p.add_argument("--local", action="store_true", help="run the model in this process, no broker")
    p.add_argument("--config", help="TOML file: broker, node and topic prefix to ask")
    p.add_argument("--broker", help="default: the configured broker, else mqtt://127.0.0.1:1883")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--node", help="the node to ask (default: this host's node id)")
    target.add_argument("--fleet", action="store_true", help="ask whichever node is free")
    p.add_argument("--client", help="who is asking: one topic level of A-Z a-z 0-9 _ - (default: the broker user)")
    p.add_argument(
        "--clean-session",
        action="store_true",
        help="no persistent MQTT session (by default the answer still arrives across a broker restart)",
    )
    p.add_argument("--profile", help="the node's assistant profile to answer with (over MQTT)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--json", action="store_true", help="print the final reply as JSON")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--max-tokens", type=int, help="default: the profile's, else the node's (--local: 256)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: cores - 1 above two cores)")
    p.add_argument("--context-tokens", type=int, help="context budget (prompt + answer)")
    models_dir_arg(p)
    p.set_defaults(func=cmd_ask)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EdgedError as exc:
        print(f"edged: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except TimeoutError as exc:
        print(f"edged: timeout: {exc}", file=sys.stderr)
        return 3
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return 1

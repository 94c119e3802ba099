"""The deployment engine: certs, node-key, superlink, supernode, run (see docs/deployment.md)."""
from __future__ import annotations

import argparse
import sys

from fl_offsite.cli.common import stoppable
from fl_offsite.ops.flower_app import app_dir

FLOWER_FLAGS = ("superlink", "supernode")  # the commands that pass flags after -- on to Flower


def cmd_certs(args: argparse.Namespace) -> None:
    from fl_offsite.ops.certs import make_certs

    out = make_certs(args.out, args.host, days=args.days, overwrite=args.overwrite)
    print(f"CA and server certificate for {', '.join(args.host)} in {out}:\n"
          f"  SuperLink (model owner) uses ca.crt, server.pem, server.key: fl-offsite superlink --certs {out}\n"
          f"  every SuperNode (data owner) gets a copy of ca.crt only:    fl-offsite supernode --ca ca.crt ...\n"
          f"  keep ca.key offline; it signs new server certificates")


def cmd_node_key(args: argparse.Namespace) -> None:
    from fl_offsite.ops.certs import make_node_key

    private, public = make_node_key(args.out, args.name, overwrite=args.overwrite)
    print(f"private key {private} (stays on this node: fl-offsite supernode --key {private})\n"
          f"public key  {public} (send to the model owner: fl-offsite superlink --node-key {public.name})")


def cmd_superlink(args: argparse.Namespace) -> None:
    from pathlib import Path

    from fl_offsite.ops.deployment import SuperLinkSettings, serve_superlink

    settings = SuperLinkSettings(
        certs=None if args.insecure else Path(args.certs).expanduser(), host=args.host, port=args.port,
        control_host=args.control_host, control_port=args.control_port,
        node_keys=tuple(Path(k).expanduser() for k in args.node_key), node_auth=not args.no_node_auth,
        database=Path(args.database).expanduser() if args.database else None, connection=args.connection,
        flower_args=tuple(args.flower_args))
    if code := serve_superlink(settings):
        sys.exit(code)


def cmd_supernode(args: argparse.Namespace) -> None:
    from pathlib import Path

    from fl_offsite.ops.deployment import SuperNodeSettings, serve_supernode

    def path(value):
        return Path(value).expanduser() if value else None
    settings = SuperNodeSettings(
        superlink=args.superlink, ca=None if args.insecure else path(args.ca), key=path(args.key),
        data_path=path(args.data_path), cache_dir=path(args.cache_dir), partition_id=args.partition_id,
        num_partitions=args.num_partitions, memory_budget_mb=args.memory_budget_mb,
        emulator_layers=args.emulator_layers, port=args.port, trusted_entities=path(args.trusted_entities),
        policy=node_policy(args.policy), flower_args=tuple(args.flower_args), warm=not args.cold_clientapps)
    if code := serve_supernode(settings):
        sys.exit(code)


def node_policy(items: list[str]) -> dict[str, str]:
    """``--policy KEY=VALUE`` items as node config keys, checked here so that a typo fails before the node starts."""
    import difflib

    from fl_offsite.app.node_policy import KEYS, NodePolicy
    from fl_offsite.app.node_store import STORE_KEYS
    from fl_offsite.config.keys import parse_sets
    from fl_offsite.errors import UserError

    policy = parse_sets(items)
    for key, value in policy.items():
        if key not in KEYS + STORE_KEYS:
            close = difflib.get_close_matches(key, KEYS + STORE_KEYS, n=1)
            raise UserError(f"--policy {key}: not a node policy key" + (f"; did you mean {close[0]}?" if close else
                            f"; known: {', '.join(KEYS + STORE_KEYS)}"))
        if key in STORE_KEYS and not value.replace(".", "", 1).isdigit():
            raise UserError(f"--policy {key}={value}: give a positive number")
    NodePolicy.from_node_config(policy)
    return policy


@stoppable
def cmd_run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from fl_offsite.config.keys import load_file, parse_sets
    from fl_offsite.config.settings import Settings, validate
    from fl_offsite.ops.deployment import run_app
    from fl_offsite.run.folder import RunFolder
    from fl_offsite.run.tables import round_table

    overrides = {**(load_file(args.config) if args.config else {}), **parse_sets(args.set)}
    config = validate(overrides)
    results = str(Path(Settings.from_config(config).results.dir).expanduser().resolve())
    overrides["results.dir"] = config["results.dir"] = results
    run_app(app_dir(), args.connection, {k: config[k] for k in overrides})
    print(round_table(RunFolder(results).rounds()))
    print(f"results: {results} (on the SuperLink's machine)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """This module's sub-commands, each bound to its handler above."""
    # Deployment: a SuperLink (model owner) and SuperNodes (data owners); see docs/deployment.md.
    certs = sub.add_parser("certs", help="make a CA and the SuperLink's TLS certificate for the given hosts")
    certs.add_argument("--host", action="append", required=True,
                       help="name or IP address the SuperLink is reached at (repeat for several)")
    certs.add_argument("--out", default="certs", help="output folder (default ./certs)")
    certs.add_argument("--days", type=int, default=365, help="validity in days")
    certs.add_argument("--overwrite", action="store_true")
    certs.set_defaults(func=cmd_certs)

    node_key = sub.add_parser("node-key", help="make a data owner's SuperNode key pair (NAME, NAME.pub)")
    node_key.add_argument("name", help="a name for the node, e.g. hospital-a")
    node_key.add_argument("--out", default="keys", help="output folder (default ./keys)")
    node_key.add_argument("--overwrite", action="store_true")
    node_key.set_defaults(func=cmd_node_key)

    link = sub.add_parser("superlink", help="model owner: run the SuperLink (TLS and node authentication)",
                          epilog="Flags after -- go to flower-superlink as they are.")
    link.add_argument("--certs", default="certs", help="folder from `fl-offsite certs` (default ./certs)")
    link.add_argument("--host", default="0.0.0.0",
                      help="where the data owners' SuperNodes connect: Fleet API only (default all interfaces)")
    link.add_argument("--port", type=int, default=9093, help="the data owners' port (default 9093)")
    link.add_argument("--control-host", default="127.0.0.1",
                      help="where the SuperLink itself listens, with its Control API (flwr run, flwr ls), which has "
                           "no authentication: keep it on loopback (the default) or a private interface")
    link.add_argument("--control-port", type=int, default=9092, help="its port (default 9092)")
    link.add_argument("--node-key", action="append", default=[], metavar="KEY.pub",
                      help="public key (or folder of *.pub) of a data owner allowed to join; repeat")
    link.add_argument("--no-node-auth", action="store_true", help="let any node with the CA join (loopback only)")
    link.add_argument("--database", help="SQLite file: keep runs and registered nodes across restarts")
    link.add_argument("--connection", default="fl-offsite-deploy",
                      help="name of the connection written to $FLWR_HOME/config.toml for `flwr run . NAME`")
    link.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (loopback only)")
    link.set_defaults(func=cmd_superlink)

    node = sub.add_parser("supernode", help="data owner: run a SuperNode that joins the model owner's SuperLink",
                          epilog="Flags after -- go to flower-supernode as they are.")
    node.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the model owner's SuperLink")
    node.add_argument("--ca", default="ca.crt", help="the model owner's CA certificate (default ./ca.crt)")
    node.add_argument("--key", help="this node's private key from `fl-offsite node-key`")
    node.add_argument("--data-path", help="JSONL file of this owner's training examples (see docs/deployment.md)")
    node.add_argument("--cache-dir", help="where the delivered emulator is cached (default ~/.cache/fl-offsite)")
    node.add_argument("--partition-id", type=int, help="without --data-path: train on this share of the task")
    node.add_argument("--num-partitions", type=int)
    node.add_argument("--memory-budget-mb", type=float,
                      help="memory this node can train in: it gets the largest emulator that fits "
                           "(fl_offsite.app.fleet)")
    node.add_argument("--emulator-layers", type=int, help="or ask for an emulator of this many middle blocks")
    node.add_argument("--port", type=int, default=9094, help="local port of the node's runtime API (one per node)")
    node.add_argument("--trusted-entities", metavar="YAML_FILE",
                      help="flower-supernode's option: run only apps signed by one of these Ed25519 keys "
                           "(in flwr 1.42 only Flower Hub signs apps; see docs/deployment.md)")
    node.add_argument("--policy", action="append", default=[], metavar="KEY=VALUE",
                      help="this node's own limits: allowed-methods, min-examples-per-update, update-clip-norm, "
                           "update-noise-multiplier, max-models, max-model-mb (docs/security.md)")
    node.add_argument("--cold-clientapps", action="store_true",
                      help="start each message's ClientApp as a fresh flwr-clientapp process (Flower's default), "
                           "not forked from a warm process that has torch and transformers imported")
    node.add_argument("--insecure", action="store_true", help="no TLS (loopback only)")
    node.set_defaults(func=cmd_supernode)

    run = sub.add_parser("run", help="model owner: run the app on the deployed federation and check it completed")
    run.add_argument("config", nargs="?", help="TOML file of run-config keys (see pyproject.toml)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    run.add_argument("--connection", default="fl-offsite-deploy", help="connection written by `fl-offsite superlink`")
    run.set_defaults(func=cmd_run)

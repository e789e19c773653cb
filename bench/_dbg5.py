import sys, os
import tunnel_agent.cloud.devhub.broker as b
orig = b.render_config
if "broker" in sys.argv:
    b.render_config = lambda spec, user: orig(spec, user) + "set_tcp_nodelay true\n"
if "service" in sys.argv:
    sys.path.insert(0, "/tmp/nodelay"); import sitecustomize  # noqa
from bench.common import Rig, LOOPBACK
from tests.support.agent import AgentRunner
with Rig("dbg") as rig:
    sink, sp = rig.sink()
    _, src = rig.peer("camera", "source", "--chunk", "0")
    env = {"PYTHONPATH": "/tmp/nodelay"} if "agent" in sys.argv else {}
    config = {"hub": rig.hub.hub_config(), "tunnel": {"allow_insecure_ws": True}, "cameras": [{"name": "c", "host": LOOPBACK, "ports": [src["tcp"]]}]}
    agent = AgentRunner(rig.folder / "a", config, env=env); rig.agents.append(agent)
    agent.wait_connected(); rig.hub.wait_device()
    ms = sorted(rig.tunnel_open(f"ws://{LOOPBACK}:{sp['ws']}/close/{i}", src["tcp"])[2] for i in range(30))
    print(sys.argv[1:], "median", round(ms[15],1), "max", round(ms[-1],1))

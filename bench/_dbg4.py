import sys
import tunnel_agent.cloud.devhub.broker as b
orig = b.render_config
if "nodelay" in sys.argv:
    b.render_config = lambda spec, user: orig(spec, user) + "set_tcp_nodelay true\n"
from bench.common import Rig, LOOPBACK, percentile
with Rig("dbg") as rig:
    sink, sp = rig.sink()
    _, src = rig.peer("camera", "source", "--chunk", "0")
    agent = rig.agent([src["tcp"]])
    ms = [rig.tunnel_open(f"ws://{LOOPBACK}:{sp['ws']}/close/{i}", src["tcp"])[2] for i in range(30)]
    print(sys.argv[1:], [round(m) for m in ms])

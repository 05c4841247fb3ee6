# diagnostic: PD servers (8B dummy) + one direct request; stacks of every process if it hangs
[ -n "$CPU" ] || source common/bench/gpu_env.sh
export DISAGG_TRANSFER_TRACE=1 PYTHONFAULTHANDLER=1
PY=${PY:-python3}
V=$1; PP=$((31000 + V * 10))
F=${DIAG_F:-"--model-path Llama-3.1-8B --load-format dummy --device cuda --host 127.0.0.1 --mem-fraction-static ${MEMF:-0.5} --cuda-graph-max-bs 4 --log-level info"}
CUDA_VISIBLE_DEVICES=0 setsid $PY -m disagg.prefill.launch --port $PP --disaggregation-bootstrap-port $((PP+1)) $F > $OUT/prefill$V.log 2>&1 &
PID1=$!
CUDA_VISIBLE_DEVICES=${DEC_GPU:-1} setsid $PY -m disagg.decode.launch --port $((PP+2)) $F > $OUT/decode$V.log 2>&1 &
PID2=$!
$PY - $PP <<'PY'
import httpx, sys, time, threading, random
pp = int(sys.argv[1]); t0 = time.time()
for port in (pp, pp + 2):
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200: break
        except Exception: pass
        if time.time() - t0 > 420: print("not ready", port); sys.exit(1)
        time.sleep(1)
print(f"ready after {time.time()-t0:.0f} s", flush=True)
for room in (101, 102, 103, 104):
    ids = [random.randrange(1000, 30000) for _ in range(2048)]
    body = dict(input_ids=ids, sampling_params=dict(max_new_tokens=2, temperature=0), bootstrap_host="127.0.0.1",
                bootstrap_port=pp + 1, bootstrap_room=room)
    res = {}
    def go(name, port):
        t = time.time()
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/generate", json=body, timeout=60)
            res[name] = (r.status_code, r.text[:300], round(time.time() - t, 3))
        except Exception as e:
            res[name] = ("EXC", repr(e), round(time.time() - t, 3))
    ths = [threading.Thread(target=go, args=a) for a in (("prefill", pp), ("decode", pp + 2))]
    [t.start() for t in ths]; [t.join() for t in ths]
    print(room, res, flush=True)
PY
sleep 1
kill -TERM -- -$PID1 -$PID2; sleep 3; kill -KILL -- -$PID1 -$PID2 2>/dev/null; sleep 1
grep -v "UCX  WARN" $OUT/decode$V.log | tail -60 > $OUT/decode$V.tail; grep -v "UCX  WARN" $OUT/prefill$V.log | tail -60 > $OUT/prefill$V.tail

# TEMPORARY design sweep on a GPU (not part of the recipe; deleted afterwards). Uses train/val only.
import json, os, sys, time, subprocess
from multiprocessing import Pool
from pathlib import Path
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE)); sys.path.insert(0, str(HERE.parent))
import make_defects as md

DATA = Path("/tmp/sweepdata")


VARIANTS = {"w": {}, "W": {"SCRATCH_WIDTH": (5.0, 9.0), "CRACK_WIDTH": (5.5, 8.0), "CRACK_END_WIDTH": 4.5}}


def _init(variant):
    for k, v in VARIANTS[variant].items():
        setattr(md, k, v)


def _one(args):
    seed, ci, i = args
    rgb, m = md.make_image(seed, md.CLASSES[ci], i, 128)
    return rgb, (np.zeros((128, 128), bool) if m is None else m)


def gen(seed, count, variant="w"):
    jobs = [(seed, ci, i) for ci in range(4) for i in range(count)]
    with Pool(16, initializer=_init, initargs=(variant,)) as p:
        r = p.map(_one, jobs, chunksize=16)
    X = np.stack([a for a, _ in r]); M = np.stack([b for _, b in r])
    y = np.array([ci for _, ci, _ in jobs])
    return X, y, M


def child(cfg):
    import torch, torch.nn.functional as F
    import train_defect_cnn as t
    import cam_quality as cq
    torch.manual_seed(0)
    dev = os.environ.get("DEV", "cuda")
    dv = cfg.get("data", "w")
    d = np.load(DATA / f"train{dv}{cfg.get('tc', 700)}.npz"); v = np.load(DATA / f"val{dv}.npz")
    Xtr = torch.from_numpy(d["X"]).to(dev); ytr = torch.from_numpy(d["y"]).to(dev)
    mean = torch.tensor(t.MEAN, device=dev).view(1, 3, 1, 1); std = torch.tensor(t.STD, device=dev).view(1, 3, 1, 1)
    prep = lambda xb: ((xb.permute(0, 3, 1, 2).float() / 255.0) - mean) / std
    model = t.build_model(cfg["layers"]).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg.get("wd", 1e-4))
    B = cfg.get("batch", 32); E = cfg["epochs"]; spe = len(ytr) // B
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=E * spe, pct_start=0.15)
    g = torch.Generator(device="cpu").manual_seed(0)
    hist = []
    t0 = time.time()

    def val():
        model.eval()
        Xv = torch.from_numpy(v["X"]).to(dev)
        with torch.no_grad():
            feats = torch.cat([model.features(prep(Xv[i:i + 100])) for i in range(0, len(Xv), 100)])
            logits = model.fc(feats.mean(dim=(2, 3)))
        W0 = model.fc.weight.detach().cpu().numpy().astype(np.float64)
        pred = logits.argmax(1).cpu().numpy(); feats = feats.cpu().numpy()
        out = {}
        for hn, W in (("raw", W0), ("center", W0 - W0.mean(0)), ("okref", W0 - W0[0])):
            rows = []; correct = {c: [0, 0] for c in md.CLASSES}
            for i, yi in enumerate(v["y"]):
                c = md.CLASSES[yi]; correct[c][0] += int(pred[i] == yi); correct[c][1] += 1
                if yi == 0: continue
                r = cq.score(cq.cam_for(feats[i], W, int(yi)), v["M"][i]); r["class"] = c; rows.append(r)
            res = cq.summarize(rows, correct)
            for c in md.CLASSES[1:]:
                res["cam"][c]["pred_px"] = int(np.mean([r["pred_px"] for r in rows if r["class"] == c]))
                res["cam"][c]["mask_px"] = int(np.mean([r["mask_px"] for r in rows if r["class"] == c]))
            out[hn] = res
        model.train()
        return out

    for ep in range(E):
        model.train()
        perm = torch.randperm(len(ytr), generator=g).to(dev)
        for s in range(spe):
            idx = perm[s * B:(s + 1) * B]
            x = prep(Xtr[idx]); yb = ytr[idx]
            k = torch.randint(0, 8, (len(idx),), generator=g).to(dev)
            out = torch.empty_like(x)
            for kk in range(8):
                sel = (k == kk).nonzero().flatten()
                if len(sel) == 0: continue
                xi = torch.rot90(x[sel], kk % 4, dims=(2, 3))
                if kk >= 4: xi = torch.flip(xi, dims=(3,))
                out[sel] = xi
            loss = F.cross_entropy(model(out), yb)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
        if (ep + 1) % max(1, E // 3) == 0 or ep + 1 == E:
            r = val()
            hist.append((ep + 1, r["raw"]["accuracy"]["all"], r["raw"]["cam"]["all"]["dice"], r["okref"]["cam"]["all"]["dice"]))
    r = val()
    torch.save(model.state_dict(), f"/tmp/sd_{cfg['name']}.pt")
    print(json.dumps({"name": cfg["name"], "cfg": cfg, "rf": t.receptive_field(cfg["layers"]),
                      "params": sum(p.numel() for p in model.parameters()), "sec": round(time.time() - t0, 1),
                      "acc": r["raw"]["accuracy"], "cam": {h: r[h]["cam"] for h in r}, "hist": hist}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "child":
        child(json.loads(sys.argv[2])); sys.exit()
    cfgs = json.load(open(sys.argv[1]))
    par = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    DATA.mkdir(exist_ok=True)
    t0 = time.time()
    for dv, tc in sorted({(c.get("data", "w"), c.get("tc", 700)) for c in cfgs}):
        X, y, M = gen(101, tc, dv); np.savez(DATA / f"train{dv}{tc}.npz", X=X, y=y)
    for dv in sorted({c.get("data", "w") for c in cfgs}):
        X, y, M = gen(202, int(os.environ.get("VC", 100)), dv); np.savez(DATA / f"val{dv}.npz", X=X, y=y, M=M)
    print(f"data {time.time() - t0:.1f}s", flush=True)
    out = open(os.environ.get("OUT", "/tmp") + "/results.jsonl", "a")
    running = []
    queue = list(cfgs)
    while queue or running:
        while queue and len(running) < par:
            c = queue.pop(0)
            running.append(subprocess.Popen([sys.executable, __file__, "child", json.dumps(c)], stdout=subprocess.PIPE, text=True))
        time.sleep(0.5)
        for p in list(running):
            if p.poll() is not None:
                txt = p.stdout.read(); print(txt.strip()[-3000:], flush=True); out.write(txt); out.flush(); running.remove(p)
    import torch
    torch.save({c["name"]: torch.load(f"/tmp/sd_{c['name']}.pt") for c in cfgs if os.path.exists(f"/tmp/sd_{c['name']}.pt")},
               os.environ.get("OUT", "/tmp") + "/sds.pt")
    print(f"all {time.time() - t0:.1f}s")

import json, numpy as np, sys
base = json.load(open('/tmp/s25/tb/results.json')); var = json.load(open('/tmp/s25/tbnl/results.json'))
B = ['dcn','dcnv2','finalnet','finalmlp','wukong']
def get(res, method, model, day):
    for e in res['results']:
        if e['method'] == method and e['model'] == model and 'per_seed' in e:
            return np.array([p[day] for p in sorted(e['per_seed'], key=lambda p: p['seed'])])
for day in ('val_auc', 'auc'):
    print(day)
    rows = []
    for m in B:
        d0, d1, r = get(base,'diet',m,day), get(var,'diet',m,day), get(base,'random',m,day)
        if d1 is None: continue
        rows.append((d0, d1, r))
        print(f"  {m}: diet {d0.mean():.4f} nolabels {d1.mean():.4f} random {r.mean():.4f} | nolabels-diet {np.mean(d1-d0):+.4f} nolabels-random {np.mean(d1-r):+.4f}")
    d0 = np.mean([x[0] for x in rows], 0); d1 = np.mean([x[1] for x in rows], 0); r = np.mean([x[2] for x in rows], 0)
    se = lambda x: x.std(ddof=1)/np.sqrt(len(x))
    print(f"  pool of {len(rows)}: diet {d0.mean():.4f} nolabels {d1.mean():.4f} random {r.mean():.4f}; nolabels-diet {np.mean(d1-d0):+.4f} ± {se(d1-d0):.4f}; nolabels-random {np.mean(d1-r):+.4f} ± {se(d1-r):.4f}")

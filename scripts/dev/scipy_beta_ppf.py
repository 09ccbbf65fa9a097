# Throwaway: scipy's Beta quantiles (what diffusers' `_convert_to_beta` reads) on the grids the
# beta ramp uses, for src/sample/ramps.rs' test.
# usage: python scripts/dev/scipy_beta_ppf.py tests/data/beta_ppf.json
import json, sys
import numpy as np
import scipy
import scipy.stats

rows = []
for a, b in [(0.6, 0.6), (0.5, 0.5), (2.0, 3.0), (0.3, 1.7)]:
    for n in (2, 3, 6, 25, 101):
        for q in 1 - np.linspace(0, 1, n):
            rows.append([a, b, float(q), float(scipy.stats.beta.ppf(q, a, b))])
for q in (1e-12, 1e-6, 0.25, 0.5, 0.75, 1 - 1e-6, 1 - 1e-12):
    rows.append([0.6, 0.6, q, float(scipy.stats.beta.ppf(q, 0.6, 0.6))])
json.dump(dict(scipy=scipy.__version__, rows=rows), open(sys.argv[1], "w"))
print(len(rows), "rows")

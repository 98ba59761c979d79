import numpy as np, pandas as pd, sys
from brainage.agebias import fit_age_bias
from brainage.apply import summarise_gaps
def run(nref, reps, seed=1, old=False):
    rng=np.random.default_rng(seed); hits=0
    for _ in range(reps):
        ages=np.r_[rng.uniform(20,80,nref), rng.uniform(60,80,20)]
        pred=ages+rng.normal(0,5,nref+20)
        b=fit_age_bias(ages[:nref],pred[:nref])
        if old: b=type(b)(b.intercept,b.slope)
        t=pd.DataFrame({"group":["c"]*nref+["p"]*20,"age":ages,"status":"predicted","gap":pred-ages,"corrected_gap":b.corrected_gap(ages,pred)})
        s=summarise_gaps(t,"group",bias=b,reference_group="c").set_index("group").loc["p"]
        hits+= s.corrected_gap_ci95_low<=0<=s.corrected_gap_ci95_high
    return 1-hits/reps
for nref in (10,3):
    print(nref, "new miss", run(nref,3000), "old miss", run(nref,3000,old=True))

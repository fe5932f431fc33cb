# bench-table.awk - the rig's backend comparison from "DOMU: BENCH <label> <workload> iops=N
# kib_s=N" lines (the part after "DOMU: BENCH "), of one run or of several: each line may be
# prefixed "run=<k> " (ratios.sh does). Prints the IOPS of every column (median over runs),
# then each column's ratio to blkback, to qdisk and to blktap3 (where present), computed
# within each run, then the median over the runs (TCG: only ratios mean anything, and they
# move from run to run). A column with several lines in one run (the rounds of the rig's
# benchmark, "round=N") counts with their mean.
function median(list,    n, a, i, j, t) {
    n = split(list, a, " ")
    if (n == 0) return -1
    for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
BEGIN { known = "blkback qdisk blktap3 tapdisk tapdisk-direct tapdisk-buffered tapdisk-map tapdisk-copy tapdisk-large tapdisk-bt3"; nk = split(known, order, " ") }
{
    run = 1
    if ($1 ~ /^run=/) { run = substr($1, 5); $0 = substr($0, index($0, " ") + 1) }
    label = $1; w = $2; split($3, a, "="); v = a[2] + 0
    if (!(run in runs)) { runs[run] = 1; nr++ }
    if (!(label in seen)) { seen[label] = 1; extra[++ne] = label }
    if (!(w in wseen)) { wseen[w] = 1; works[++nw] = w }
    sum[run, label, w] += v; cnt[run, label, w]++; have[run, label, w] = 1
}
END {
    for (k in sum) iops[k] = sum[k] / cnt[k]
    nl = 0
    for (i = 1; i <= nk; i++) if (order[i] in seen) cols[++nl] = order[i]
    for (i = 1; i <= ne; i++) { k = 0; for (j = 1; j <= nk; j++) if (order[j] == extra[i]) k = 1; if (!k) cols[++nl] = extra[i] }
    printf "%-22s", (nr > 1 ? "IOPS, median of " nr " runs" : "workload (IOPS)")
    for (c = 1; c <= nl; c++) printf " %13s", cols[c]
    printf "\n"
    for (i = 1; i <= nw; i++) {
        printf "%-22s", works[i]
        for (c = 1; c <= nl; c++) {
            l = ""; for (r in runs) if (have[r, cols[c], works[i]]) l = l " " iops[r, cols[c], works[i]]
            m = median(l); if (m < 0) printf " %13s", "-"; else printf " %13.0f", m
        }
        printf "\n"
    }
    nb = split("blkback qdisk blktap3", bases, " ")
    for (b = 1; b <= nb; b++) {
        base = bases[b]; if (!(base in seen)) continue
        printf "%-22s", "ratio to " base
        for (c = 1; c <= nl; c++) printf " %13s", (cols[c] == base ? "" : cols[c])
        printf "\n"
        for (i = 1; i <= nw; i++) {
            printf "%-22s", works[i]
            for (c = 1; c <= nl; c++) {
                if (cols[c] == base) { printf " %13s", ""; continue }
                l = ""
                for (r in runs) if (have[r, cols[c], works[i]] && have[r, base, works[i]] && iops[r, base, works[i]] > 0)
                    l = l " " iops[r, cols[c], works[i]] / iops[r, base, works[i]]
                m = median(l); if (m < 0) printf " %13s", "-"; else printf " %13.2f", m
            }
            printf "\n"
        }
    }
}

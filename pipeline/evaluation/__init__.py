"""How good a bank is: image AUROC, pixel AUROC and PRO, the threshold, the HTML report
and heatmap overlays."""

"""Reading results: Pareto frontiers and the decision function, the cost model, the claims report."""

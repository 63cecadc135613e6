"""Privacy audits: membership inference and gradient inversion against privmed models."""

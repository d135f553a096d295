"""Feature dashboards: what each SAE latent does, with exact loss effects and overall importance, as a static site."""

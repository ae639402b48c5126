"""Training the models explainkit explains: recipes, augmentation, LR range test, the loop, reports."""

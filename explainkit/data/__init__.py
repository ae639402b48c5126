"""Datasets: ImageFolder trees and the CIFAR-10 download, read with a model card's preprocessing."""

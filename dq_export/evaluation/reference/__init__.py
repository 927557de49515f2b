"""The trained reference model and its judge: tiny-sd drawing scikit-learn's handwritten
digits, and a digit classifier that scores what it draws (accuracy, digits FID), so
quantization can be judged on images with a right answer rather than on random weights."""

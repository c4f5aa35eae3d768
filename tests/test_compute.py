from lit_sftrl.compute import FlopsCounter


def test_flops_are_6nd_for_training_and_2nd_for_inference_plus_the_inherited_start():
    counter = FlopsCounter(num_parameters=1000, initial=7.0)
    counter.add_training(10)
    counter.add_inference(5)
    assert counter.total == 7 + 6 * 1000 * 10 + 2 * 1000 * 5
    restored = FlopsCounter(num_parameters=1)
    restored.load_state_dict(counter.state_dict())
    assert restored.total == counter.total

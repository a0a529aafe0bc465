"""Report sections and the CheXpert-style labeller (nbs/13_data.reports.ipynb), on sentences written in the language of
real chest radiograph, CT, MR and ultrasound reports, and against the phantom cohort's report ground truth."""
import gzip
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import f1_score

from rwid_nb.data.reports import (CHEXPERT, DEFAULT_VOCABULARY, LABEL_FORMATS, SECTIONS, VocabularyError, caption_text,
                                  explain_report, header_section, label_agreement, label_report, label_reports, load_vocabulary,
                                  read_report_texts, split_sections, split_sentences, write_labels, write_vocabulary)

# Hand-written sentences, one pattern per group: (sentence, the labels it must get; observations not named are not checked).
# Chest radiograph sentences are labelled with modality 'CR' (so that e.g. "nodule" is lung_lesion, not the CT lung_nodule).
NEG_BEFORE = [
    ("No focal consolidation, pleural effusion, or pneumothorax.", dict(consolidation=0, pleural_effusion=0, pneumothorax=0)),
    ("There is no pneumothorax.", dict(pneumothorax=0)),
    ("The lungs are clear without focal consolidation, effusion, or pneumothorax.",
     dict(consolidation=0, pleural_effusion=0, pneumothorax=0, lung_opacity=0)),
    ("Negative for pneumothorax.", dict(pneumothorax=0)),
    ("Lungs are free of focal airspace disease.", dict(consolidation=0, lung_opacity=0)),
    ("No evidence of pneumonia.", dict(pneumonia=0)),
    ("No radiographic evidence of acute pulmonary edema.", dict(edema=0)),
    ("No signs of pneumonia or pulmonary edema.", dict(pneumonia=0, edema=0)),
    ("Interval resolution of the previously seen right pleural effusion.", dict(pleural_effusion=0)),
    ("Absence of pneumothorax following chest tube removal.", dict(pneumothorax=0, support_devices=0)),
    ("Without evidence of acute rib fracture.", dict(fracture=0)),
    ("No large pleural effusion or pneumothorax.", dict(pleural_effusion=0, pneumothorax=0)),
    ("No displaced rib fractures are identified.", dict(fracture=0)),
    ("Interval removal of the right chest tube.", dict(support_devices=0)),
    ("There is no longer a left pleural effusion.", dict(pleural_effusion=0)),
    ("No pneumothorax post right thoracentesis.", dict(pneumothorax=0)),
    ("No focal airspace consolidation to suggest pneumonia.", dict(consolidation=0, pneumonia=0)),
]
LISTS = [
    ("There is no evidence of focal consolidation, pleural effusion, pneumothorax or pulmonary edema.",
     dict(consolidation=0, pleural_effusion=0, pneumothorax=0, edema=0)),
    ("No pneumothorax, pleural effusion, or pulmonary edema.", dict(pneumothorax=0, pleural_effusion=0, edema=0)),
    ("There is no focal consolidation,\npleural effusion or pneumothorax.", dict(consolidation=0, pleural_effusion=0, pneumothorax=0)),
    ("No pulmonary edema, consolidation, or effusion; small right apical pneumothorax is noted.",
     dict(edema=0, consolidation=0, pleural_effusion=0, pneumothorax=1)),
]
NEG_AFTER = [
    ("A pneumothorax is not seen.", dict(pneumothorax=0)),
    ("The previously noted left basilar atelectasis has resolved.", dict(atelectasis=0)),
    ("Pleural effusions are absent.", dict(pleural_effusion=0)),
    ("The endotracheal tube has been removed.", dict(support_devices=0)),
    ("Focal consolidation is not identified.", dict(consolidation=0)),
    ("Pneumothorax: none.", dict(pneumothorax=0)),
    ("The right apical pneumothorax is no longer visualized.", dict(pneumothorax=0)),
    ("Previously seen right upper lobe nodule is no longer seen.", dict(lung_lesion=0)),
    ("The left pleural effusion has since resolved.", dict(pleural_effusion=0)),
]
SCOPE = [
    ("No pneumothorax, but there is a small left pleural effusion.", dict(pneumothorax=0, pleural_effusion=1)),
    ("No focal consolidation; however, there is mild pulmonary vascular congestion.", dict(consolidation=0, edema=1)),
    ("No acute osseous abnormality with the exception of an old healed right rib fracture.", dict(fracture=1)),
    ("No new consolidation, and the heart is mildly enlarged.", dict(consolidation=0, cardiomegaly=1)),
    ("The lungs are clear except for minimal left basilar atelectasis.", dict(consolidation=0, atelectasis=1)),
    ("Minimal atelectasis at the left base, otherwise the lungs are clear.", dict(atelectasis=1, consolidation=0)),
    ("The nasogastric tube has been removed and the right PICC line terminates in the mid SVC.", dict(support_devices=1)),
    ("Mild cardiomegaly, with no pulmonary edema.", dict(cardiomegaly=1, edema=0)),
    ("Cardiomegaly without pulmonary edema.", dict(cardiomegaly=1, edema=0)),
    ("No effusion is seen, although the heart is enlarged.", dict(pleural_effusion=0, cardiomegaly=1)),
    ("Pleural effusion has resolved, small residual pneumothorax.", dict(pleural_effusion=0, pneumothorax=1)),
    ("Unchanged position of the left chest tube; no residual pneumothorax.", dict(support_devices=1, pneumothorax=0)),
    ("Possible left effusion without pneumothorax.", dict(pleural_effusion=-1, pneumothorax=0)),
]
UNC_BEFORE = [
    ("Possible small right pleural effusion.", dict(pleural_effusion=-1)),
    ("Possibly small bilateral effusions.", dict(pleural_effusion=-1)),
    ("Opacity at the left lung base may represent atelectasis or early pneumonia.", dict(lung_opacity=1, atelectasis=-1, pneumonia=-1)),
    ("Cannot rule out a small left pneumothorax.", dict(pneumothorax=-1)),
    ("We cannot exclude an underlying consolidation.", dict(consolidation=-1)),
    ("Questionable small nodular opacity in the right upper lobe.", dict(lung_lesion=-1)),
    ("Findings are suspicious for pneumonia in the right lower lobe.", dict(pneumonia=-1)),
    ("Increased interstitial markings, concerning for pulmonary edema.", dict(edema=-1, lung_opacity=1)),
    ("Right basilar opacity, likely atelectasis.", dict(lung_opacity=1, atelectasis=-1)),
    ("Differential includes pneumonia and aspiration.", dict(pneumonia=-1)),
    ("Patchy opacities suggestive of multifocal pneumonia.", dict(pneumonia=-1, lung_opacity=1)),
    ("Left retrocardiac opacity could be due to atelectasis.", dict(atelectasis=-1, lung_opacity=1)),
    ("The heart may be mildly enlarged.", dict(cardiomegaly=-1)),
    ("Borderline cardiomegaly.", dict(cardiomegaly=-1)),
    ("Heart size is borderline enlarged.", dict(cardiomegaly=-1)),
    ("Probable small bilateral pleural effusions.", dict(pleural_effusion=-1)),
    ("Subtle opacity at the right base, which could reflect aspiration or developing pneumonia.", dict(pneumonia=-1, lung_opacity=1)),
    ("Blunting of the right costophrenic angle may reflect a small effusion or pleural thickening.",
     dict(pleural_effusion=-1, pleural_other=-1)),
    ("? Right lower lobe pneumonia.", dict(pneumonia=-1)),
    ("Left basilar consolidation is concerning for pneumonia.", dict(consolidation=1, pneumonia=-1)),
    ("Compared to prior, there is increased opacification of the left lower lobe which may reflect worsening atelectasis or pneumonia.",
     dict(lung_opacity=1, atelectasis=-1, pneumonia=-1)),
    ("Apparent nodular opacity over the left lower lung likely represents a nipple shadow.", dict(lung_lesion=-1)),
    ("Possible tiny left apical pneumothorax, not clearly seen on the lateral view.", dict(pneumothorax=-1)),
]
UNC_AFTER_AND_DOUBLE_NEG = [  # double negations are uncertain, never negative
    ("A small pneumothorax cannot be excluded.", dict(pneumothorax=-1)),
    ("Early pneumonia cannot be entirely excluded.", dict(pneumonia=-1)),
    ("Pneumonia is not excluded.", dict(pneumonia=-1)),
    ("Developing pneumonia is not ruled out.", dict(pneumonia=-1)),
    ("A small left pleural effusion is possible.", dict(pleural_effusion=-1)),
    ("Pneumothorax is unlikely.", dict(pneumothorax=-1)),
    ("Mild pulmonary vascular congestion is likely.", dict(edema=-1)),
    ("There is no pneumothorax, although a tiny apical pneumothorax cannot be excluded.", dict(pneumothorax=-1)),
    ("Hazy opacity in the right lower lung may be due to overlying soft tissue, but pneumonia is difficult to exclude.",
     dict(lung_opacity=1, pneumonia=-1)),
    ("Bibasilar opacities are most likely atelectasis, though aspiration or pneumonia cannot be excluded in the appropriate "
     "clinical setting.", dict(atelectasis=-1, pneumonia=-1, lung_opacity=1)),
    ("Interval increase in size of the moderate right pleural effusion with adjacent atelectasis. Underlying consolidation "
     "cannot be excluded.", dict(pleural_effusion=1, atelectasis=1, consolidation=-1)),
]
NO_DEFINITE = [  # negative: "definite" qualifies the confidence in what was not seen
    ("No definite focal consolidation.", dict(consolidation=0)),
    ("No definite pneumothorax is identified.", dict(pneumothorax=0)),
    ("Crowding of bronchovascular markings without definite focal consolidation.", dict(consolidation=0)),
    ("No apparent pneumothorax.", dict(pneumothorax=0)),
]
VERSUS = [
    ("Left lower lobe atelectasis versus consolidation.", dict(atelectasis=-1, consolidation=-1)),
    ("Right lower lobe opacity, atelectasis vs. pneumonia.", dict(atelectasis=-1, pneumonia=-1, lung_opacity=1)),
    ("Small left effusion and basal atelectasis versus consolidation.", dict(pleural_effusion=1, atelectasis=-1, consolidation=-1)),
    ("Dense retrocardiac opacity, compatible with left lower lobe collapse and/or consolidation.",
     dict(atelectasis=-1, consolidation=-1, lung_opacity=1)),
]
PSEUDO = [
    ("No change in moderate cardiomegaly.", dict(cardiomegaly=1)),
    ("Stable cardiomegaly.", dict(cardiomegaly=1)),
    ("No interval change in the small left pleural effusion.", dict(pleural_effusion=1)),
    ("Not only is there cardiomegaly but also a new right effusion.", dict(cardiomegaly=1, pleural_effusion=1)),
    ("Bilateral pleural effusions without significant change.", dict(pleural_effusion=1)),
    ("Partial resolution of the right pleural effusion.", dict(pleural_effusion=1)),
    ("No significant interval change in the right upper lobe mass.", dict(lung_lesion=1)),
    ("The previously described right lower lobe consolidation is not significantly changed.", dict(consolidation=1)),
    ("There is a small left pleural effusion, not significantly changed.", dict(pleural_effusion=1)),
    ("There has been interval placement of a right-sided chest tube with near complete resolution of the right pneumothorax.",
     dict(support_devices=1, pneumothorax=1)),
    ("Small bilateral pleural effusions are similar. Pulmonary edema has nearly resolved.", dict(pleural_effusion=1, edema=1)),
    ("Support lines and tubes are unchanged in position.", dict(support_devices=1)),
    ("Nasogastric tube tip is not visualized.", dict(support_devices=1)),
    ("The tip of the right PICC line is not well seen.", dict(support_devices=1)),
]
NORMAL = [
    ("Heart size is normal.", dict(cardiomegaly=0)),
    ("Heart is normal in size.", dict(cardiomegaly=0)),
    ("Normal cardiac silhouette.", dict(cardiomegaly=0)),
    ("The cardiomediastinal silhouette is within normal limits.", dict(cardiomegaly=0, enlarged_cardiomediastinum=0)),
    ("The lungs are clear.", dict(consolidation=0, lung_opacity=0, edema=0, pneumonia=0, atelectasis=None, lung_lesion=None)),
    ("Lungs are hyperinflated but clear.", dict(consolidation=0)),
    ("The costophrenic angles are sharp.", dict(pleural_effusion=0)),
    ("Heart size is top normal.", dict(cardiomegaly=0)),
    ("The heart size is at the upper limits of normal.", dict(cardiomegaly=0)),
    ("The heart is not enlarged.", dict(cardiomegaly=0)),
    ("Pulmonary vascularity is normal.", dict(edema=0)),
    ("The cardiac and mediastinal contours are stable.", dict(cardiomegaly=None, enlarged_cardiomediastinum=None)),
]
POSITIVE = [
    ("Moderate cardiomegaly.", dict(cardiomegaly=1)),
    ("Heart size remains enlarged.", dict(cardiomegaly=1)),
    ("Severe cardiomegaly is unchanged.", dict(cardiomegaly=1)),
    ("The heart is moderately enlarged with a left ventricular configuration.", dict(cardiomegaly=1)),
    ("Large left pleural effusion with associated compressive atelectasis.", dict(pleural_effusion=1, atelectasis=1)),
    ("Right pleural effusion is slightly smaller.", dict(pleural_effusion=1)),
    ("Endotracheal tube terminates 4 cm above the carina.", dict(support_devices=1)),
    ("Right internal jugular central venous catheter tip in the mid SVC.", dict(support_devices=1)),
    ("Left-sided dual-lead pacemaker with leads in expected position.", dict(support_devices=1)),
    ("Right-sided Port-A-Cath with tip at the cavoatrial junction.", dict(support_devices=1)),
    ("The ET tube is 3 cm above the carina; the NG tube courses below the diaphragm.", dict(support_devices=1)),
    ("The endotracheal tube has been pulled back and now terminates 5 cm above the carina.", dict(support_devices=1)),
    ("There is a new right upper lobe consolidation.", dict(consolidation=1)),
    ("Mildly displaced fracture of the left seventh rib.", dict(fracture=1)),
    ("Old healed left rib fractures.", dict(fracture=1)),
    ("Calcified pleural plaques are seen bilaterally.", dict(pleural_other=1)),
    ("Widening of the mediastinum.", dict(enlarged_cardiomediastinum=1)),
    ("The cardiomediastinal silhouette is enlarged but stable.", dict(enlarged_cardiomediastinum=1)),
    ("Small right apical pneumothorax.", dict(pneumothorax=1)),
    ("Pneumothorax is seen at the right apex, measuring 1.5 cm.", dict(pneumothorax=1)),
    ("Moderate pulmonary edema.", dict(edema=1)),
    ("Mild interstitial edema has improved.", dict(edema=1)),
    ("Mild pulmonary edema, slightly improved from prior.", dict(edema=1)),
    ("There is mild vascular congestion without overt pulmonary edema.", dict(edema=1)),  # positive > negative
    ("Findings consistent with congestive heart failure.", dict(edema=1)),
    ("Low lung volumes with bibasilar atelectasis.", dict(atelectasis=1)),
    ("Right lower lobe collapse.", dict(atelectasis=1)),
    ("There is persistent elevation of the right hemidiaphragm with adjacent atelectasis.", dict(atelectasis=1)),
    ("Trace bilateral pleural effusions.", dict(pleural_effusion=1)),
    ("Lines and tubes are in standard position.", dict(support_devices=1)),
    ("Hyperinflated lungs consistent with emphysema.", dict(emphysema=1)),
    ("Emphysematous changes are noted.", dict(emphysema=1)),
    ("Multifocal pneumonia is again seen, slightly improved.", dict(pneumonia=1)),
    ("Right middle lobe opacity is again seen, consistent with known pneumonia.", dict(lung_opacity=1, pneumonia=1)),
    ("Right upper lobe mass with post-obstructive pneumonia.", dict(lung_lesion=1, pneumonia=1)),
    ("Linear opacity in the lingula most consistent with scarring.", dict(lung_opacity=1)),
    ("Left PICC terminates in the proximal SVC.", dict(support_devices=1)),
    ("An enteric tube is seen coursing into the stomach and out of view.", dict(support_devices=1)),
    ("Patchy right lower lobe airspace opacity, compatible with pneumonia in the appropriate clinical setting.",
     dict(consolidation=1, lung_opacity=1, pneumonia=1)),
]
QUESTIONS = [  # asked about in the findings, not reported on
    ("Limited evaluation for pneumothorax on this supine film.", dict(pneumothorax=None)),
]
CXR = dict(neg_before=NEG_BEFORE, lists=LISTS, neg_after=NEG_AFTER, scope=SCOPE, unc_before=UNC_BEFORE,
           unc_after=UNC_AFTER_AND_DOUBLE_NEG, no_definite=NO_DEFINITE, versus=VERSUS, pseudo=PSEUDO, normal=NORMAL,
           positive=POSITIVE, questions=QUESTIONS)
OTHER_MODALITIES = [
    ("A 6 mm solid nodule in the right upper lobe.", 'CT', dict(lung_nodule=1)),
    ("No suspicious pulmonary nodules.", 'CT', dict(lung_nodule=0)),
    ("No new or enlarging pulmonary nodules.", 'CT', dict(lung_nodule=0)),
    ("Stable 4 mm left lower lobe nodule, likely benign.", 'CT', dict(lung_nodule=1)),
    ("Multiple bilateral pulmonary nodules measuring up to 9 mm, suspicious for metastatic disease.", 'CT', dict(lung_nodule=1)),
    ("Ground-glass opacity in the left upper lobe, possibly a subsolid nodule; follow-up is advised.", 'CT', dict(lung_nodule=-1)),
    ("Centrilobular emphysema, most pronounced in the upper lobes.", 'CT', dict(emphysema=1)),
    ("Mild paraseptal emphysema.", 'CT', dict(emphysema=1)),
    ("Subpleural reticulation and honeycombing with basal predominance, consistent with usual interstitial pneumonia.", 'CT',
     dict(fibrosis=1)),
    ("No mediastinal, hilar or axillary lymphadenopathy.", 'CT', dict(lymphadenopathy=0)),
    ("Small bilateral pleural effusions with adjacent compressive atelectasis.", 'CT', dict(pleural_effusion=1)),
    ("Trace right pleural effusion.", 'CT', dict(pleural_effusion=1)),
    ("Minimal dependent atelectasis. No consolidation or pleural effusion.", 'CT', dict(pleural_effusion=0)),
    ("No intracranial mass, hemorrhage, or midline shift.", 'MR', dict(brain_mass=0, intracranial_hemorrhage=0)),
    ("No acute intracranial hemorrhage, mass effect, or midline shift.", 'MR', dict(intracranial_hemorrhage=0, brain_mass=None)),
    ("Scattered periventricular white matter hyperintensities, likely chronic small vessel ischemic change.", 'MR',
     dict(white_matter_lesions=1)),
    ("Few nonspecific foci of T2/FLAIR hyperintensity in the subcortical white matter.", 'MR', dict(white_matter_lesions=1)),
    ("Enhancing mass in the left temporal lobe with surrounding vasogenic edema.", 'MR', dict(brain_mass=1)),
    ("A non-enhancing lesion in the right frontal lobe could represent a low-grade glioma or tumour.", 'MR', dict(brain_mass=-1)),
    ("A 2.1 cm enhancing extra-axial mass along the left frontal convexity, likely a meningioma.", 'MR', dict(brain_mass=1)),
    ("Cholelithiasis without sonographic evidence of acute cholecystitis.", 'US', dict(gallstones=1)),
    ("The gallbladder is distended, without stones or wall thickening.", 'US', dict(gallstones=0)),
    ("Gallbladder sludge without shadowing stones.", 'US', dict(gallstones=0)),
    ("Multiple gallstones measuring up to 1.5 cm, without gallbladder wall thickening or pericholecystic fluid.", 'US',
     dict(gallstones=1)),
    ("Echogenic focus in the gallbladder, possibly a small stone or polyp.", 'US', dict(gallstones=-1)),
    ("The gallbladder is contracted, limiting evaluation for gallstones.", 'US', dict(gallstones=None)),
    ("Simple cyst in the right hepatic lobe measuring 1.2 cm.", 'US', dict(liver_cyst=1)),
    ("No focal hepatic lesion.", 'US', dict(liver_cyst=0)),
    ("Liver is normal in echotexture without focal lesion.", 'US', dict(liver_cyst=0)),
    ("Simple renal cyst in the left kidney; the liver is normal.", 'US', dict(liver_cyst=None)),
    ("No hydronephrosis. Several simple cysts in the liver, the largest measuring 2 cm.", 'US', dict(hydronephrosis=0, liver_cyst=1)),
]
REPORTS = [  # whole reports, as written (sections, wrapping, numbered impressions)
    ("PA and lateral views of the chest were obtained. There is a left\nlower lobe opacity which could represent atelectasis or "
     "pneumonia.\nThere is no pneumothorax.", dict(lung_opacity=1, atelectasis=-1, pneumonia=-1, pneumothorax=0)),
    ("FINDINGS: The patient is status post median sternotomy and CABG. Sternal wires are intact. Heart size is mildly enlarged. "
     "There is mild pulmonary vascular congestion. No focal consolidation. No pleural effusions.\nIMPRESSION: Mild cardiomegaly and "
     "mild pulmonary vascular congestion.", dict(support_devices=1, cardiomegaly=1, edema=1, consolidation=0, pleural_effusion=0, no_finding=0)),
    ("IMPRESSION: No acute cardiopulmonary process.", dict(no_finding=1, cardiomegaly=None)),
    ("There is a right IJ catheter with its tip in the SVC. No pneumothorax is identified.", dict(support_devices=1, pneumothorax=0)),
    ("There is no focal consolidation. There is no pleural effusion or pneumothorax. The heart is top-normal in size.",
     dict(consolidation=0, pleural_effusion=0, pneumothorax=0, cardiomegaly=0, no_finding=1)),
    ("No evidence of displaced rib fracture. Small left apical pneumothorax is new.", dict(fracture=0, pneumothorax=1)),
    ("Severe emphysema. No pneumothorax.", dict(emphysema=1, pneumothorax=0)),
    ("No pleural effusion is seen. The right costophrenic angle is excluded from the field of view.", dict(pleural_effusion=0)),
    ("Clinical history: Cough, rule out pneumonia.\nFindings: Lungs are clear. No effusion.\nImpression: Normal chest radiograph.",
     dict(pneumonia=0, pleural_effusion=0, no_finding=1)),
    ("IMPRESSION:\n1. New right lower lobe consolidation concerning for pneumonia.\n2. Stable small left effusion.",
     dict(consolidation=1, pneumonia=-1, pleural_effusion=1)),
    ("Patchy bibasilar airspace opacities may reflect atelectasis though infection is not excluded.",
     dict(consolidation=1, atelectasis=-1, pneumonia=-1)),
    ("No pneumothorax on the right. A small left apical pneumothorax cannot be excluded.", dict(pneumothorax=-1)),  # unc > neg
    ("Possible right effusion.\nIMPRESSION: Small right pleural effusion.", dict(pleural_effusion=1)),           # pos > unc
    ("INDICATION: Rule out pneumothorax. Evaluate for pneumonia.\nFINDINGS: Heart size is normal.",
     dict(pneumothorax=None, pneumonia=None, cardiomegaly=0, no_finding=1)),  # the indication is never labelled
]

_CASES = [pytest.param(s, 'CR', exp, id=f'{group}-{i}') for group, cases in CXR.items() for i, (s, exp) in enumerate(cases)] + \
         [pytest.param(s, m, exp, id=f'{m}-{i}') for i, (s, m, exp) in enumerate(OTHER_MODALITIES)] + \
         [pytest.param(s, 'CR', exp, id=f'report-{i}') for i, (s, exp) in enumerate(REPORTS)]


def test_enough_sentences():
    assert len(_CASES) >= 60
    assert all(len(CXR[g]) >= 3 for g in CXR if g != 'questions')


@pytest.mark.parametrize('text,modality,expected', _CASES)
def test_sentence(text, modality, expected):
    got = label_report(text, modality=modality)
    wrong = {k: (v, got[k]) for k, v in expected.items() if got[k] != v}
    assert not wrong, f"(expected, got) {wrong}\n{explain_report(text, modality=modality).to_string()}"


def test_double_negation_never_negative():
    for s in ('A small pneumothorax cannot be excluded.', 'Cannot exclude pneumothorax.', 'Pneumothorax is not ruled out.',
              'Pneumothorax cannot be ruled out.', 'We can not exclude a pneumothorax.', 'A pneumothorax is not excluded.'):
        assert label_report(s)['pneumothorax'] == -1, s


def test_modality_restricts_observations():
    text = 'A 9 mm nodule in the right upper lobe. Heart size is normal.'
    unknown, ct, cr = label_report(text), label_report(text, modality='CT'), label_report(text, modality='cr')
    assert unknown['lung_nodule'] == unknown['lung_lesion'] == 1 and unknown['cardiomegaly'] == 0
    assert ct['lung_nodule'] == 1 and ct['lung_lesion'] is None and ct['cardiomegaly'] is None and ct['no_finding'] is None
    assert cr['lung_lesion'] == 1 and cr['lung_nodule'] is None and cr['no_finding'] == 0


def test_no_finding():
    assert set(label_report('').values()) == {None}
    assert set(label_report('   \n ').values()) == {None}
    # computed from the other observations, so "no findings" can never read as a negated "finding"
    for s in ('No acute findings.', 'No abnormal findings.', 'No acute cardiopulmonary process.', 'Degenerative changes of the spine.'):
        assert label_report(s)['no_finding'] == 1, s
    assert label_report('Moderate cardiomegaly.')['no_finding'] == 0
    assert label_report('A small pneumothorax cannot be excluded.')['no_finding'] == 0  # uncertain counts against it
    assert label_report('No pneumothorax. No effusion.')['no_finding'] == 1
    # devices count against it, as in the phantom; CheXpert's convention is one vocabulary line away
    dev = 'Endotracheal tube in standard position. The lungs are clear.'
    assert label_report(dev)['no_finding'] == 0
    v = load_vocabulary()
    v['no_finding']['ignore'] = ['support_devices']
    assert label_report(dev, v)['no_finding'] == 1
    assert label_report('Cardiomegaly.', v)['no_finding'] == 0


def test_explain_report_names_the_rule():
    ex = explain_report('Heart size is normal. A small pneumothorax cannot be excluded. No effusion.')
    rules = dict(zip(ex.observation, ex.rule))
    assert rules['cardiomegaly'] == 'normal phrase'
    assert 'cannot be excluded' in rules['pneumothorax'] and rules['pneumothorax'].startswith('uncertain')
    assert rules['pleural_effusion'].startswith('negated before')


# ---------------------------------------------------------------- sections

@pytest.mark.parametrize('header,section', [
    ('FINDINGS:', 'findings'), ('Findings -', 'findings'), ('Findings', 'findings'), ('REPORT:', 'findings'), ('Description:', 'findings'),
    ('IMPRESSION', 'impression'), ('Conclusion:', 'impression'), ('Opinion:', 'impression'), ('Summary:', 'impression'),
    ('Comment:', 'impression'), ('Assessment:', 'impression'), ('Diagnosis:', 'impression'), ('History:', 'indication'),
    ('Clinical details:', 'indication'), ('Clinical information:', 'indication'), ('Clinical indication:', 'indication'),
    ('CLINICAL PROFILE:', 'indication'), ('Clinical notes:', 'indication'), ('Reason for exam:', 'indication'),
    ('Comparison:', 'comparison'), ('Prior:', 'comparison'), ('Technique:', 'other'), ('PROTOCOL:', 'other'),
    ('Impresion:', 'impression'), ('IMPRESSSION:', 'impression'), ('FINDNGS:', 'findings'), ('FIDNINGS:', 'findings'),
    ('Clincal history:', 'indication'), ('Conclsuion:', 'impression'),
    ('Lungs:', None), ('Pleura:', None), ('Heart and mediastinum:', None), ('Devices:', None), ('Prio:', None), ('Normal', None)])
def test_header_section(header, section):
    assert header_section(header) == section


def test_sections_of_site_styles():
    us = ("EXAM: XR CHEST PA AND LATERAL\n\nCLINICAL HISTORY:\nShortness of breath.\n\nTECHNIQUE:\nPA and lateral views of the chest."
          "\n\nCOMPARISON:\nNone.\n\nFINDINGS:\nNo focal consolidation.\nThe cardiomediastinal silhouette is within normal limits.\n\n"
          "IMPRESSION:\n1. No acute cardiopulmonary process.")
    s = split_sections(us)
    assert s == {'indication': 'Shortness of breath.', 'comparison': 'None.',
                 'findings': 'No focal consolidation.\nThe cardiomediastinal silhouette is within normal limits.',
                 'impression': '1. No acute cardiopulmonary process.',
                 'other': 'EXAM: XR CHEST PA AND LATERAL\nTECHNIQUE:\nPA and lateral views of the chest.'}
    au = ("Clinical details: Cough.\n\nFindings - Small right pleural effusion.\n\nOpinion: Small right effusion.\n\n"
          "Thank you for your referral.")
    assert split_sections(au) == {'indication': 'Cough.', 'comparison': '', 'findings': 'Small right pleural effusion.',
                                  'impression': 'Small right effusion.', 'other': 'Thank you for your referral.'}
    ke = "CLINICAL NOTES: Fever.\n\nREPORT: No consolidation.\n\nCONCLUSION: Normal chest X-ray.\n\nReported by: consultant radiologist."
    assert split_sections(ke)['other'] == 'Reported by: consultant radiologist.'
    assert split_sections(ke)['findings'] == 'No consolidation.'


def test_sections_missing_headers_and_typos():
    jp = "Clinical information: Cough.\nComparison: None.\nNo focal consolidation.\nNo pleural effusion.\nSummary: Normal."
    s = split_sections(jp)
    assert (s['indication'], s['comparison'], s['findings'], s['impression']) == \
           ('Cough.', 'None.', 'No focal consolidation.\nNo pleural effusion.', 'Normal.')
    assert split_sections('Heart size is normal.\nThe lungs are clear.')['findings'] == 'Heart size is normal.\nThe lungs are clear.'
    assert split_sections('The lungs are clear.\n\nIMPRESSION: Normal.')['findings'] == 'The lungs are clear.'
    typo = "CLINICAL HISTORY: Cough.\n\nFIDNINGS: Mild cardiomegaly.\n\nIMPRESION: Mild cardiomegaly.\n\nPlease correlate clinically."
    assert split_sections(typo) == {'indication': 'Cough.', 'comparison': '', 'findings': 'Mild cardiomegaly.',
                                    'impression': 'Mild cardiomegaly.', 'other': 'Please correlate clinically.'}
    flat = "INDICATION: Dyspnea. COMPARISON: None. FINDINGS: Mild cardiomegaly. IMPRESSION: Mild cardiomegaly."
    assert split_sections(flat)['findings'] == 'Mild cardiomegaly.' and split_sections(flat)['indication'] == 'Dyspnea.'
    wrapped = "HISTORY: 65 year old man with\nshortness of breath.\nFINDINGS: Clear lungs."
    assert split_sections(wrapped)['indication'] == '65 year old man with\nshortness of breath.'
    structured = "FINDINGS:\nLungs: No focal consolidation.\nPleura: No effusion.\nIMPRESSION: Normal."
    assert split_sections(structured)['findings'] == 'Lungs: No focal consolidation.\nPleura: No effusion.'
    assert split_sections(None) == dict.fromkeys(SECTIONS, '')


def test_caption_text():
    assert caption_text(split_sections('FINDINGS: A.\nIMPRESSION: B.')) == ('A.\nB.', 'findings+impression')
    assert caption_text(split_sections('FINDINGS: A.')) == ('A.', 'findings')
    assert caption_text(split_sections('CONCLUSION: B.')) == ('B.', 'impression')
    assert caption_text(split_sections('TECHNIQUE: PA view.')) == ('TECHNIQUE: PA view.', 'other')
    assert caption_text(split_sections('')) == ('', '')


def test_split_sentences():
    assert split_sentences('Findings discussed with Dr. Jones at 3 pm. A 3.5 cm mass, e.g. a tumour. Atelectasis vs. pneumonia.') == \
           ['Findings discussed with Dr. Jones at 3 pm.', 'A 3.5 cm mass, e.g. a tumour.', 'Atelectasis vs. pneumonia.']
    assert split_sentences('1. Small effusion.\n2. No pneumothorax\n- Clear lungs') == ['Small effusion.', 'No pneumothorax', 'Clear lungs']
    assert split_sentences('No effusion or\npneumothorax.') == ['No effusion or pneumothorax.']


# ---------------------------------------------------------------- reading and writing

@pytest.fixture
def reports_df():
    return pd.DataFrame({'study_key': [' K1', 'K2 ', 'K3'], 'report_text': [
        'FINDINGS: Small left pleural effusion. No pneumothorax.\nIMPRESSION: Small left effusion.',
        'The lungs are clear. Possible right lower lobe pneumonia.', '']})


def test_read_report_texts_formats(tmp_path, reports_df):
    reports_df.to_csv(tmp_path/'r.csv', index=False)
    with gzip.open(tmp_path/'r.csv.gz', 'wt') as f: reports_df.to_csv(f, index=False)
    reports_df.to_parquet(tmp_path/'r.parquet')
    reports_df.to_json(tmp_path/'r.jsonl', orient='records', lines=True)
    (tmp_path/'txt'/'sub').mkdir(parents=True)
    for k, t in zip(reports_df.study_key, reports_df.report_text): (tmp_path/'txt'/'sub'/f'{k.strip()}.txt').write_text(t)
    want = {'study_key': ['K1', 'K2', 'K3'], 'report_text': list(reports_df.report_text)}
    for src in ('r.csv', 'r.csv.gz', 'r.parquet', 'r.jsonl', 'txt'):
        got = read_report_texts(tmp_path/src)
        assert got.to_dict('list') == want, src


def test_read_report_texts_errors(tmp_path, reports_df):
    with pytest.raises(FileNotFoundError, match='no such file'): read_report_texts(tmp_path/'missing.csv')
    reports_df.rename(columns={'report_text': 'text'}).to_csv(tmp_path/'cols.csv', index=False)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['report_text'\]; it has \['study_key', 'text'\]"):
        read_report_texts(tmp_path/'cols.csv')
    (tmp_path/'r.xlsx').write_text('x')
    with pytest.raises(ValueError, match="unknown suffix '.xlsx'"): read_report_texts(tmp_path/'r.xlsx')
    pd.concat([reports_df, reports_df.iloc[:2]]).to_csv(tmp_path/'dup.csv', index=False)
    with pytest.raises(ValueError, match='2 duplicate study_key'): read_report_texts(tmp_path/'dup.csv')
    (tmp_path/'empty').mkdir()
    with pytest.raises(ValueError, match='no <study_key>.txt files'): read_report_texts(tmp_path/'empty')


def test_label_reports_table(reports_df):
    df = reports_df.assign(modality=['CR', 'DX', 'CR'])
    t = label_reports(df)
    obs = list(load_vocabulary())
    assert list(t.columns) == ['study_key', *obs, *SECTIONS, 'caption', 'caption_section']
    assert all(str(t[o].dtype) == 'Int8' for o in obs)
    assert t.study_key.tolist() == [' K1', 'K2 ', 'K3']  # as given: read_report_texts is what strips keys
    assert t.loc[0, ['pleural_effusion', 'pneumothorax', 'no_finding']].tolist() == [1, 0, 0]
    assert t.loc[1, ['pneumonia', 'consolidation', 'no_finding']].tolist() == [-1, 0, 0]
    assert t.loc[2, obs].isna().all() and t.loc[2, 'caption_section'] == ''
    assert t.caption_section.tolist()[:2] == ['findings+impression', 'findings']
    assert t.loc[0, 'lung_nodule'] is pd.NA  # a CT observation on a radiograph
    with pytest.raises(ValueError, match='lacks column'): label_reports(df.drop(columns='report_text'))


@pytest.mark.parametrize('fmt', LABEL_FORMATS)
def test_write_labels_round_trip(tmp_path, reports_df, fmt):
    reports_df.to_csv(tmp_path/'r.csv', index=False)
    out = tmp_path/'out'/f'labels{fmt}'
    table = write_labels(tmp_path/'r.csv', out)
    if fmt == '.parquet': back = pd.read_parquet(out)
    elif fmt == '.jsonl': back = pd.read_json(out, lines=True, dtype=False)
    else: back = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(back.columns) == list(table.columns)
    num = lambda col: [None if (isinstance(v, str) and v == '') or pd.isna(v) else int(v) for v in col]
    for o in load_vocabulary(): assert num(back[o]) == num(table[o]), o
    assert back.study_key.astype(str).tolist() == ['K1', 'K2', 'K3']
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # nothing half-written left behind


def test_write_labels_errors(tmp_path, reports_df):
    reports_df.to_csv(tmp_path/'r.csv', index=False)
    with pytest.raises(ValueError, match='unknown suffix'): write_labels(tmp_path/'r.csv', tmp_path/'labels.xlsx')
    assert not (tmp_path/'labels.xlsx').exists()
    with pytest.raises(FileNotFoundError): write_labels(tmp_path/'none.csv', tmp_path/'labels.csv')


# ---------------------------------------------------------------- vocabulary

def test_default_vocabulary():
    v = load_vocabulary()
    assert list(v)[:14] == list(CHEXPERT) and len(CHEXPERT) == 14
    from rwid_nb.data.phantom import ALL_FINDINGS
    assert set(ALL_FINDINGS) <= set(v)
    assert 'no_finding' in v and not v['no_finding']['mentions']
    assert DEFAULT_VOCABULARY.startswith('#')


def test_vocabulary_round_trip_and_custom(tmp_path):
    p = write_vocabulary(tmp_path/'v.toml')
    assert load_vocabulary(p) == load_vocabulary()
    with pytest.raises(FileExistsError): write_vocabulary(p)
    p.write_text(p.read_text() + '\n[bronchiectasis]\nmentions = ["bronchiectas*"]\nmodalities = ["CT"]\n')
    lab = label_report('Cylindrical bronchiectasis in both lower lobes. No nodule.', p, modality='CT')
    assert lab['bronchiectasis'] == 1 and lab['lung_nodule'] == 0
    assert label_report('No bronchiectasis.', str(p))['bronchiectasis'] == 0


@pytest.mark.parametrize('text,message', [
    ('[x]\nmentions = ["a"]\nsynonyms = ["b"]\n', "[x] 'synonyms': unknown key"),
    ('[x]\nnormal = ["a"]\n', '[x] mentions: is required'),
    ('[X]\nmentions = ["a"]\n', 'snake_case'),
    ('[x]\nmentions = "a"\n', '[x] mentions: must be a list'),
    ('[x]\nmentions = ["a ..."]\n', "'...' goes between two words"),
    ('[x]\nmentions = ["a*b"]\n', "'*' only at the end of a word"),
    ('[x]\nmentions = ["a"]\nhedge_links = "yes"\n', '[x] hedge_links: must be true or false'),
    ('[findings]\nmentions = ["a"]\n', 'reserved column name'),
    ('[no_finding]\nmentions = ["normal"]\n', 'has no mentions'),
    ('[no_finding]\nignore = ["devices"]\n', "unknown observation(s) ['devices']"),
    ('[x\n', 'not valid TOML'),
])
def test_vocabulary_errors(tmp_path, text, message):
    (tmp_path/'bad.toml').write_text(text)
    with pytest.raises(VocabularyError) as e: load_vocabulary(tmp_path/'bad.toml')
    assert message in str(e.value) and 'bad.toml' in str(e.value) and '\n' not in str(e.value)


# ---------------------------------------------------------------- the phantom

def test_agreement_with_phantom(tables):
    """Labels of the phantom cohort's reports.csv against ground_truth.csv report_<finding>: per-finding F1 of label == 1."""
    from rwid_nb.data.phantom import ALL_FINDINGS
    gt, rep = tables['gt'], tables['reports']
    lab = label_reports(rep.merge(gt[['study_key', 'modality']], on='study_key'))
    m = gt.merge(lab, on='study_key', suffixes=('_image', ''))
    assert len(m) == len(gt) == len(rep)
    vocab = load_vocabulary()
    f1s, agree = {}, {}
    for f in (*ALL_FINDINGS, 'no_finding'):
        d = m[m.modality.isin(vocab[f]['modalities'])]
        ref = pd.to_numeric(d[f'report_{f}'], errors='coerce').astype(float).fillna(9)  # 9: empty, a value of its own
        got = pd.to_numeric(d[f], errors='coerce').astype(float).fillna(9)
        if (ref == 1).sum() == 0: continue
        f1s[f] = f1_score(ref == 1, got == 1)
        agree[f] = float((ref == got).mean())
    assert len(f1s) >= 12
    assert min(f1s.values()) >= 0.9, {k: round(v, 3) for k, v in f1s.items()}
    assert min(agree.values()) >= 0.85, {k: round(v, 3) for k, v in agree.items()}
    table = label_agreement(lab, gt, list(f1s))  # the notebook's helper agrees with sklearn here
    assert all(abs(table.f1[f] - f1s[f]) < 1e-9 for f in f1s)
    assert set(lab.caption_section) <= {'findings+impression', 'findings', 'impression'}
